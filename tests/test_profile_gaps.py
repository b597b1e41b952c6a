"""benchmarks/profile_gaps.py: GPU busy/idle accounting on hand-made profiler events, and on a real CPU profile."""
import torch

from benchmarks.profile_gaps import Event, from_profiler, kind_of, stage_report

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
        Event("cudaGraphLaunch", "cuda_runtime", 62 * US, 63 * US, corr=84, thread=1),  # no op around it but Update.run
        Event("g1", "kernel", 70 * US, 72 * US, corr=84),  # a graph replay's kernel: no linked op
    ]


def test_busy_idle_and_attribution():
    lines = stage_report(_events(), min_gap_us=5, min_stage_ms=0)
    head = next(line for line in lines if line.startswith("stage/update"))
    # span 11..72 us; busy 19 + 15 + 1 + 2 = 37 us (60.7%); idle 24 us: gaps of 15 and 8 us (>= 5 us) and 1 us
    assert "span 0.1" in head and "busy 0.0 (60.7%)" in head, head
    idle = [line.strip() for line in lines if line.strip().startswith("idle ")]
    assert len(idle) == 2 and idle[0].endswith("1x  before aten::_to_copy < PackedSeqs < Update.run"), idle
    assert idle[1].endswith("1x  before cudaGraphLaunch in Update.run"), idle
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


class _OldKinetoEvent:
    """A torch < 2.13 kineto event: no activity_type(), no is_user_annotation() (as on the GPU machine's 2.11)."""

    def __init__(self, name, device):
        self._name, self._device = name, device

    def name(self):
        return self._name

    def device_type(self):
        return self._device


def test_kind_without_activity_type():
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    cases = {("stage/update", cpu): "user_annotation", ("aten::mm", cpu): "cpu_op",
             ("cudaMemcpyAsync", cpu): "cuda_runtime", ("cuLaunchKernelEx", cpu): "cuda_runtime",
             ("CompiledFunctionBackward", cpu): "cpu_op", ("Memcpy DtoH (Device -> Pageable)", cuda): "gpu_memcpy",
             ("Memset (Device)", cuda): "gpu_memset", ("nvjet_sm90_tst_256x128", cuda): "kernel"}
    assert {key: kind_of(_OldKinetoEvent(*key)) for key in cases} == cases
