"""`verl-mega demo --task vision --quick` end to end (2 processes at tp 2: the task written to multimodal
parquet, a tiny random VLM + processor, SFT with images, GRPO with images through PPOTrainer.fit, held-out
validation), checking that the pipeline runs and writes its metrics and summary. The demo's learning
result (>= 15 points over the SFT start) is measured by the full run (README), not here."""

import json
import math

from tests.run_python import run_python


def test_vision_demo_quick(tmp_path):
    out = tmp_path / "demo"
    proc = run_python(["-m", "verl_mega", "demo", "--task", "vision", "--quick", "--output-dir", str(out)], timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rl_steps"] == len(summary["rewards"]) == 2
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "actor/loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["actor/loss"]) for r in steps)
    assert sum("val/accuracy" in r for r in records) >= 2  # before RL and after
    assert (out / "model_sft" / "config.json").exists() and (out / "reward_curve.png").exists()
    assert "held-out accuracy" in proc.stdout
