"""The user-facing entry points run as users run them (subprocesses): the quick start script and
`verl-mega demo --quick` (2 spawned ranks, tp=2, SFT then GRPO, accuracy printed, plot + metrics written)."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_quick_start_prints_metrics():
    proc = subprocess.run([sys.executable, os.path.join(REPO, "examples", "quick_start.py")], capture_output=True,
                          text=True, timeout=300, env=ENV, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = proc.stdout.strip().splitlines()[0]
    metrics = eval(first, {"__builtins__": {}})  # the printed dict of rounded floats
    for key in ("loss", "reward_mean", "kl", "entropy", "grad_norm", "response_length"):
        assert isinstance(metrics[key], float), key
    assert metrics["response_length"] > 0 and "responses:" in proc.stdout


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "verl_mega", "demo", "--quick", "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=600, env=ENV, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out accuracy" in proc.stdout and "demo finished" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["heldout_accuracy_before_rl"] <= 1.0 and 0.0 <= summary["heldout_accuracy_after_rl"] <= 1.0
    assert summary["rl_steps"] == 3 and "tp=2" in summary["layout"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert (out / "reward_curve.png").stat().st_size > 1000
    assert (out / "model_sft" / "tokenizer.json").exists()  # the tokenizer (HF form, adds BOS) travels with the model
