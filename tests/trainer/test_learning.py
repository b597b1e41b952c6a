"""Learning checks: GRPO (a group estimator) and PPO (critic + GAE) raise the held-out greedy accuracy of the
demo task over a short fixed-seed run, as a user runs it (`verl-mega demo`, one process).

One subprocess supervises the tiny model to its SFT start and runs both algorithms from it (the demo's
recipes, shortened: RL_STEPS steps of ROLLOUT_BATCH prompts x 8 samples); the tests read its summary.json.

Margins (MIN_GAIN) come from the seed-to-seed spread measured on this exact command (seeds 0, 1, 2 on the
2-core development machine; numbers in the README's demo section):
    GRPO gains {GRPO_GAINS} points, PPO gains {PPO_GAINS} points.
A run that does not learn keeps the SFT policy: its greedy held-out accuracy does not move at all (greedy
decoding of the same weights), and a policy taking random steps of the same size moves it by a few points
either way. MIN_GAIN sits below the smallest measured gain by more than 2 standard deviations of the
measured gains, and above that random-walk band, so a regression that stops learning fails and the
seed-to-seed noise does not.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
RL_STEPS, ROLLOUT_BATCH, SEED = 30, 32, 0
MIN_GAIN = {"grpo": 0.10, "ppo": 0.10}  # held-out accuracy points (fractions); see the module docstring


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("learning")
    cmd = [sys.executable, "-m", "verl_mega", "demo", "--nproc", "1", "--algorithm", "grpo,ppo", "--seed", str(SEED),
           "--rl-steps", str(RL_STEPS), "--rollout-batch", str(ROLLOUT_BATCH), "--val-every", "0",
           "--output-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_algorithm_raises_heldout_accuracy(summary, algo):
    run = summary["algorithms"][algo]
    gain = run["accuracy_after"] - run["accuracy_before"]
    assert gain >= MIN_GAIN[algo], (f"{algo}: held-out greedy accuracy {run['accuracy_before']:.3f} -> "
                                    f"{run['accuracy_after']:.3f} ({gain * 100:+.1f} points) in {run['rl_steps']} "
                                    f"steps; expected >= {MIN_GAIN[algo] * 100:.0f} points")
