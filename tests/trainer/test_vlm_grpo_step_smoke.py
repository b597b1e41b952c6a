"""`benchmarks/vlm_grpo_step.py --smoke` end to end on CPU (a tiny VLM, 2 prompts x 2 samples, one image each,
as a user runs it): it finishes, writes its JSON, the per-phase and vision-tower figures are finite, and the
tower ran once in rollout (one call for all the prompts admitted together, shared by their samples) and once
per micro-batch in the log-prob pass."""

import json
import math
import os
import subprocess
import sys

from tests.run_python import child_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_vlm_grpo_step_smoke(tmp_path):
    env = child_env()
    # the separate old-log-prob pass: the tower's calls in the log-prob phase are counted too (by default an on-policy
    # update takes its own old log-probs, and without a reference the phase is empty)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "vlm_grpo_step.py"), "--smoke",
                           "--old-logprobs", "recompute", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "vlm_grpo_step.json").read_text())
    assert report["tokens_per_s_per_gpu"] > 0 and math.isfinite(report["step_s"])
    for phase in ("rollout", "logprob", "update"):
        assert report["phase_s"][phase] > 0 and 0 < report["vision_share"][phase] < 1, phase
    # rollout: one tower call for all the prompts (their 2 x 2 rows are admitted in one step); log-prob: one per
    # micro-batch (2 x 2 rows in micro-batches of 2)
    assert report["vision_calls"]["rollout"] == 1
    assert report["vision_calls"]["logprob"] == report["prompts"] * report["n"] // 2
    assert "vision tower" in proc.stdout
