"""The GPU's clocks, power and slowdown reasons while a block of code runs, sampled by `nvidia-smi` in a child
process (`with GPUClocks() as clocks: ...; clocks.summary()`).

A step that runs the same kernels on the same shapes can still take longer when the card lowers its SM clock
(power cap, temperature, a hardware slowdown). Sampling the clock during each measured step tells that apart from a
slower program. Nothing is sampled on CPU runs or where `nvidia-smi` is missing: `summary()` is then None.
"""

from __future__ import annotations

import os
import shutil
import subprocess

# nvidia-smi --query-gpu fields; clocks_event_reasons.active is a bit mask (NVML's nvmlClocksEventReasons:
# 0x1 idle, 0x4 software power cap, 0x8 hardware slowdown, 0x20 software thermal, 0x40 hardware thermal,
# 0x80 hardware power brake; 0x0 none)
FIELDS = ("clocks.sm", "clocks.mem", "power.draw", "temperature.gpu", "clocks_event_reasons.active")
REASONS = {0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake"}


def parse_samples(text: str) -> list[tuple[float, float, float, float, int]]:
    """nvidia-smi's csv lines (noheader, nounits) -> (sm MHz, memory MHz, watts, degrees C, reasons mask) for each
    line of the first GPU's values that parses; lines that do not ('[N/A]', a partial last line) are dropped."""
    samples = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(FIELDS):
            continue
        try:
            samples.append((float(parts[0]), float(parts[1]), float(parts[2]), float(parts[3]), int(parts[4], 16)))
        except ValueError:
            continue
    return samples


def summarise(samples: list[tuple[float, float, float, float, int]]) -> dict | None:
    """Samples -> mean and min SM clock (MHz), mean power (W), max temperature (C), and the slowdown reasons seen
    in any sample with the share of samples that had one. None without samples."""
    if not samples:
        return None
    sm = [s[0] for s in samples]
    mask = 0
    for s in samples:
        mask |= s[4]
    slowed = sum(1 for s in samples if s[4] & sum(REASONS))
    return {"samples": len(samples), "sm_mhz_mean": sum(sm) / len(sm), "sm_mhz_min": min(sm),
            "power_w_mean": sum(s[2] for s in samples) / len(samples), "temp_c_max": max(s[3] for s in samples),
            "slowdown": [name for bit, name in REASONS.items() if mask & bit], "slowdown_share": slowed / len(samples)}


def smi_id(device: int) -> str:
    """nvidia-smi's `--id` for torch's CUDA device number `device`: under CUDA_VISIBLE_DEVICES (e.g. "2,3" or GPU
    UUIDs) its entry for that device, else the number itself."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[device] if device < len(visible) else str(device)


class GPUClocks:
    """Samples FIELDS every `interval_ms` for torch's CUDA device `device` while in use; `summary()` after the
    block. device None (a CPU run): nothing is sampled."""

    def __init__(self, device: int | None, interval_ms: int = 100):
        self.smi_id = None if device is None else smi_id(device)
        self.interval_ms, self._proc, self._text = interval_ms, None, ""

    def __enter__(self):
        exe = shutil.which("nvidia-smi")
        if exe is not None and self.smi_id is not None:
            self._proc = subprocess.Popen(
                [exe, f"--id={self.smi_id}", f"--query-gpu={','.join(FIELDS)}", "--format=csv,noheader,nounits",
                 f"--loop-ms={self.interval_ms}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc):
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._text, _ = self._proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._text, _ = self._proc.communicate()

    def summary(self) -> dict | None:
        return summarise(parse_samples(self._text))
