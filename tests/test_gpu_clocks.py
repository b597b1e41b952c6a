"""benchmarks/gpu_clocks.py: nvidia-smi's samples -> the per-step clock summary in grpo_e2e.py's A/B table."""

from benchmarks.gpu_clocks import GPUClocks, parse_samples, smi_id, summarise

# three samples as `nvidia-smi --query-gpu=<FIELDS> --format=csv,noheader,nounits` prints them, with a line that
# does not parse (a field the driver cannot read) and a partial last line (the sampler stopped mid-write)
TEXT = """1980, 2619, 690.12, 61, 0x0000000000000000
1755, 2619, 700.01, 64, 0x0000000000000004
[N/A], 2619, 650.00, 63, 0x0000000000000000
1830, 2619, 695.50, 66, 0x0000000000000024
1980, 26"""


def test_parse_samples_keeps_the_lines_that_parse():
    samples = parse_samples(TEXT)
    assert [s[0] for s in samples] == [1980.0, 1755.0, 1830.0]
    assert [s[4] for s in samples] == [0x0, 0x4, 0x24]


def test_summarise_gives_mean_min_clock_and_the_slowdown_reasons_seen():
    summary = summarise(parse_samples(TEXT))
    assert summary["samples"] == 3
    assert summary["sm_mhz_mean"] == (1980 + 1755 + 1830) / 3 and summary["sm_mhz_min"] == 1755
    assert summary["temp_c_max"] == 66
    assert summary["slowdown"] == ["sw_power_cap", "sw_thermal"]  # 0x4 | 0x24
    assert summary["slowdown_share"] == 2 / 3
    assert summarise([]) is None


def test_no_samples_without_nvidia_smi(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with GPUClocks(0) as clocks:
        pass
    assert clocks.summary() is None


def test_no_sampler_for_a_cpu_run(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/nvidia-smi")  # even where nvidia-smi exists
    with GPUClocks(None) as clocks:
        assert clocks._proc is None
    assert clocks.summary() is None


def test_smi_id_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert smi_id(1) == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert (smi_id(0), smi_id(1)) == ("2", "3")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f3a")
    assert smi_id(0) == "GPU-8f3a"
