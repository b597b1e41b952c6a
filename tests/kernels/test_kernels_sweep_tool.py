"""The tuning tool's variant kernels (benchmarks/logprob_sweep.py) compute what production computes.

They wrap the production tile functions with device-side TMA descriptors; the tool's own
interpreter check compares both directions (split and unsplit backward stores) with fp32 torch.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sweep_tool_variants_match_reference_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "logprob_sweep.py"), "--interpret-check"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "interpreter check passed" in proc.stdout
