"""The user-facing entry points run as users run them (subprocesses): the quick start script and
`verl-mega demo --quick` (2 spawned ranks, tp=2, SFT then GRPO, accuracy printed, plot + metrics written,
the RL model saved as a HF directory)."""

import json
import os

from tests.run_python import REPO, run_python


def test_quick_start_prints_metrics():
    proc = run_python([os.path.join(REPO, "examples", "quick_start.py")], timeout=300)
    first = proc.stdout.strip().splitlines()[0]
    metrics = eval(first, {"__builtins__": {}})  # the printed dict of rounded floats
    for key in ("actor/loss", "reward/mean", "actor/ppo_kl", "actor/entropy", "actor/grad_norm", "actor/lr",
                "response_length/mean"):
        assert isinstance(metrics[key], float), key
    assert metrics["actor/lr"] > 0 and metrics["response_length/mean"] > 0 and "responses:" in proc.stdout


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    proc = run_python(["-m", "verl_mega", "demo", "--quick", "--output-dir", str(out)], timeout=600)
    assert "held-out accuracy" in proc.stdout and "demo finished" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["heldout_accuracy_before_rl"] <= 1.0 and 0.0 <= summary["heldout_accuracy_after_rl"] <= 1.0
    assert summary["rl_steps"] == 3 and "tp=2" in summary["layout"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]  # step 0: validation before RL
    # the held-out accuracies are the validation hook's, before the first and after the last step
    assert records[0]["val/accuracy"] == summary["heldout_accuracy_before_rl"]
    assert records[-1]["val/accuracy"] == summary["heldout_accuracy_after_rl"]
    assert (out / "reward_curve.png").stat().st_size > 1000
    assert (out / "model_sft" / "tokenizer.json").exists()  # the tokenizer (HF form, adds BOS) travels with the model
    rl_dir = out / "model_rl"
    assert (rl_dir / "config.json").exists() and (rl_dir / "tokenizer.json").exists()
    assert str(rl_dir) in proc.stdout  # its path is printed


def test_demo_recipes_load_and_compare_fairly():
    """Every demo recipe is a valid config for its algorithm, and all generate the same number of samples per step
    from the same start for the same number of steps (the comparison in the README is fair)."""
    from verl_mega.apps import demo
    from verl_mega.trainer.config import check_config

    args = demo.parse_args(["--algorithm", "all"])
    shapes = set()
    for algo in demo.ALGORITHMS:
        cfg = demo.rl_config(algo, args, "/runs/model_sft", f"/runs/{algo}")
        check_config(cfg)
        assert cfg.algorithm.name == algo and cfg.model.path == "/runs/model_sft"
        assert cfg.data.val_path == "/runs/heldout.jsonl" and cfg.trainer.val_every > 0
        shapes.add((cfg.trainer.rollout_batch_size * cfg.rollout.n_samples, cfg.trainer.total_steps,
                    cfg.rollout.temperature, cfg.rollout.max_new_tokens))
    assert len(shapes) == 1
    quick = demo.rl_config("ppo", demo.parse_args(["--quick"]), "/runs/model_sft", "/runs")
    assert (quick.trainer.total_steps, quick.trainer.rollout_batch_size, quick.trainer.val_every) == (3, 8, 0)


def test_demo_rejects_unrunnable_options_before_spawning(capsys, monkeypatch):
    """A layout the demo model cannot take, no RL steps, or a recipe the options break: argparse's exit 2 with one
    line naming the flag, before any process starts (not a traceback from every spawned rank)."""
    import pytest

    from verl_mega.apps import demo

    monkeypatch.delenv("RANK", raising=False)
    for argv, fragment in ((["--tp", "3"], "tensor-parallel size 3 (--tp"), (["--nproc", "3"], "tensor-parallel size 3"),
                           (["--nproc", "4", "--tp", "2"], None), (["--nproc", "3", "--tp", "2"], "--tp 2 must divide"),
                           (["--nproc", "0"], "--nproc must be >= 1"), (["--rl-steps", "0"], "--rl-steps must be >= 1"),
                           (["--n-samples", "1"], "rollout.n_samples must be >= 2"),
                           (["--algorithm", "rloo", "--rl-lr", "-1"], "lr must be positive"),
                           (["--task", "vision", "--tp", "4", "--nproc", "4"], "--tp 1 or --tp 2")):
        if fragment is None:
            assert demo.parse_args(["--quick", *argv]).nproc == 4
            continue
        with pytest.raises(SystemExit) as exc:
            demo.parse_args(["--quick", *argv])
        assert exc.value.code == 2 and fragment in capsys.readouterr().err, argv
