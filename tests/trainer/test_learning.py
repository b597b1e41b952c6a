"""Learning checks: GRPO (a group estimator) and PPO (critic + GAE) raise the held-out greedy accuracy of the
demo task over a short fixed-seed run, as a user runs it (`verl-mega demo`, one process).

One demo process per algorithm, both at once, each supervising the tiny model to the same SFT start and running its
algorithm from it (the demo's recipes, shortened: RL_STEPS steps of ROLLOUT_BATCH prompts x 8 samples); the tests
read their summary.json files.

Margins (MIN_GAIN), from the seed-to-seed spread of this exact command (held-out greedy accuracy gain in
points, seeds 0 / 1 / 2; the SFT start differs per seed: 26.5% / 41% / 37.5%):
    GRPO +30.0 / +20.5 / +9.5   (mean 20.0, sd 10.3)
    PPO  +25.5 / +19.0 / +2.5   (mean 15.7, sd 11.9; 5 of its 30 steps are critic warm-up)
CI runs seed 0. A change of numerics (library version, machine) moves a run about as much as a change of
seed, so the threshold is seed 0's gain minus 2 sd: GRPO 30.0 - 20.6 = 9.4 -> 9 points; PPO 25.5 - 23.8 = 1.7,
raised to a floor of 5 points: a run that does not learn keeps the SFT weights and gains exactly 0 (greedy
decoding), and a 200-prompt accuracy near 0.3-0.5 has a binomial sd of about 3.5 points, so gains under
5 points do not show learning. (Seed 2's PPO, +2.5 in this short run, would fail: the short run is a check
that learning happens at the CI seed, not a guarantee for every seed; the 80-step demo gains 31-37 points.)
Re-run on 2026-12-07 (this code, seed 0): GRPO +25.5, PPO +25.5 points (26.5% -> 52.0% each). The rule on those
gives GRPO 4.9 and PPO 1.7, both under the 5-point floor; GRPO keeps its stricter 9 points, which that run clears by
16.5. Cost on an idle 2-core machine: about 105 s in one process (SFT about 30 s, GRPO 31 s, PPO 40 s); the two
processes at once take about 67 s.
"""

import json

import pytest

from tests.run_python import finish_python, start_python

RL_STEPS, ROLLOUT_BATCH, SEED = 30, 32, 0
MIN_GAIN = {"grpo": 0.09, "ppo": 0.05}  # held-out accuracy gain (fractions); derived in the module docstring


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    """{algo: the demo's summary of its run}. One demo process per algorithm, both at once (the 2 cores: about
    70 s wall instead of 105 s one after the other); each supervises the same SFT start (same seed, one thread)."""
    runs = {}
    for algo in MIN_GAIN:
        out = tmp_path_factory.mktemp(f"learning_{algo}")
        args = ["-m", "verl_mega", "demo", "--nproc", "1", "--algorithm", algo, "--seed", str(SEED), "--rl-steps",
                str(RL_STEPS), "--rollout-batch", str(ROLLOUT_BATCH), "--val-every", "0", "--output-dir", str(out)]
        runs[algo] = (out, start_python(args))
    try:
        for out, proc in runs.values():
            finish_python(proc, timeout=600)
    finally:  # one failed: the other is not left running
        for _, proc in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return {algo: json.loads((out / "summary.json").read_text())["algorithms"][algo] for algo, (out, _) in runs.items()}


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_algorithm_raises_heldout_accuracy(summary, algo):
    run = summary[algo]
    gain = run["accuracy_after"] - run["accuracy_before"]
    assert gain >= MIN_GAIN[algo], (f"{algo}: held-out greedy accuracy {run['accuracy_before']:.3f} -> "
                                    f"{run['accuracy_after']:.3f} ({gain * 100:+.1f} points) in {run['rl_steps']} "
                                    f"steps; expected >= {MIN_GAIN[algo] * 100:.0f} points")


def test_both_runs_start_from_the_same_sft_model(summary):
    """The two processes supervise the same SFT start (same seed, one thread each): the same held-out accuracy."""
    assert summary["grpo"]["accuracy_before"] == summary["ppo"]["accuracy_before"]
