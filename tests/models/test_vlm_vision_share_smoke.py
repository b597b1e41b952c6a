"""benchmarks/vlm_vision_share.py runs end to end on CPU in its --smoke mode (as the integrator runs it on the GPU)."""

import json
import math
import os
import subprocess
import sys

from tests.run_python import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_vision_share_benchmark_smoke(tmp_path):
    env = child_env()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "vlm_vision_share.py"), "--smoke",
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    record = json.loads((tmp_path / "vlm_vision_share.json").read_text())
    ms = record["ms"]
    assert all(math.isfinite(v) and v > 0 for v in ms.values()), ms
    # shares are ratios of separately timed runs: on a loaded CPU they can pass 1, so only their sign is checked
    assert ms["share_train_per_sample"] > 0 and ms["share_prefill"] > 0
    assert record["image_tokens"] == 4  # a 56 x 56 image: 4 x 4 patches of 14 px, merged 2 x 2
