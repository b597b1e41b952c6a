"""benchmarks/profile_gaps.py: GPU busy/idle accounting on hand-made profiler events, and on a real CPU profile."""
import torch

from benchmarks.profile_gaps import Event, from_profiler, stage_report

US = 1000  # ns


def _events():
    return [
        Event("stage/update", "user_annotation", 0, 100 * US, corr=1, thread=1),
        Event("Update.run", "cpu_op", 0, 100 * US, corr=2, thread=1),
        Event("aten::mm", "cpu_op", 10 * US, 12 * US, corr=5, thread=1),
        Event("PackedSeqs", "cpu_op", 39 * US, 42 * US, corr=7, thread=1),
        Event("aten::_to_copy", "cpu_op", 40 * US, 41 * US, corr=6, thread=1),
        Event("cudaMemcpyAsync", "cuda_runtime", 40 * US + 200, 40 * US + 900, corr=90, linked=6, thread=1),
        Event("k1", "kernel", 11 * US, 30 * US, corr=80, linked=5),
        Event("k1b", "kernel", 20 * US, 25 * US, corr=81, linked=5),  # overlaps k1 (another stream): not counted twice
        Event("k2", "kernel", 45 * US, 60 * US, corr=82, linked=6),
        Event("k3", "kernel", 60 * US + 1000, 61 * US + 1000, corr=83, linked=5),  # 1 us gap: below min_gap_us
    ]


def test_busy_idle_and_attribution():
    lines = stage_report(_events(), min_gap_us=5, min_stage_ms=0)
    head = next(line for line in lines if line.startswith("stage/update"))
    # span 11..62 us = 0.051 ms; busy 19 + 15 + 1 = 35 us; idle 16 us, 15 of them in the one gap >= 5 us
    assert "span 0.1" in head and "busy 0.0 (68.6%)" in head, head
    idle = [line for line in lines if line.strip().startswith("idle ")]
    assert len(idle) == 1 and "1x  before aten::_to_copy < PackedSeqs < Update.run" in idle[0], idle
    waits = [line for line in lines if line.strip().startswith("host wait")]
    assert len(waits) == 1 and "cudaMemcpyAsync in aten::_to_copy < PackedSeqs < Update.run" in waits[0], waits


def test_real_cpu_profile_reads_events():
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("stage/update"):
            x = torch.randn(64, 64)
            (x @ x).sum()
    events = from_profiler(prof)
    names = {e.name for e in events}
    assert "stage/update" in names and "aten::mm" in names
    stage = next(e for e in events if e.name == "stage/update")
    assert stage.kind == "user_annotation" and stage.end > stage.start
    assert stage_report(events)[1:] == []  # no device activity on CPU: no stage line, nothing invented
