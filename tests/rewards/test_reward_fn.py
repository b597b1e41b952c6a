"""compute_rewards: calling conventions, failures, timeouts, concurrency of async functions."""

import asyncio
import math
import time

import pytest
import torch

from verl_mega.rewards import RewardFunction, RuleBasedReward, compute_rewards


def test_response_style_and_verl_style():
    r = compute_rewards(lambda response: float("120" in response), ["x120", "no", "120!"])
    assert torch.equal(r.scores, torch.tensor([1.0, 0.0, 1.0])) and r.scores.dtype == torch.float32
    assert (r.failures, r.timeouts, r.errors) == (0, 0, [])

    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        return {"score": float(solution_str == ground_truth) + extra_info["bonus"], "src": data_source}

    samples = [
        {"data_source": "a", "reward_model": {"ground_truth": "yes"}, "extra_info": {"bonus": 0.5}},
        {"data_source": "b", "ground_truth": "yes", "extra_info": {"bonus": 0.0}},
    ]
    r = compute_rewards(compute_score, ["yes", "no"], samples)
    assert RewardFunction(compute_score).style == "compute_score"
    assert r.scores.tolist() == [1.5, 0.0] and r.extras == [{"src": "a"}, {"src": "b"}]

    # a subset of verl's names, called by keyword
    r = compute_rewards(lambda ground_truth, solution_str: float(ground_truth in solution_str), ["ab", "c"],
                        [{"ground_truth": "b"}] * 2)
    assert r.scores.tolist() == [1.0, 0.0]


def test_raising_and_bad_values_are_counted_failures():
    def fn(response):
        if response == "boom":
            raise RuntimeError("reward bug")
        return {"nan": math.nan, "str": "1.0", "nokey": {"s": 1}}.get(response, 2.0)

    r = compute_rewards(fn, ["ok", "boom", "nan", "str", "nokey"])
    assert r.scores.tolist() == [2.0, 0.0, 0.0, 0.0, 0.0]
    assert r.failures == 4 and r.timeouts == 0
    joined = "\n".join(r.errors)
    assert "sample 1: RuntimeError: reward bug" in joined and "NaN" in joined
    assert "must be a number" in joined and "no 'score' key" in joined


def test_hanging_function_times_out_fast():
    def fn(response):
        if response == "hang":
            time.sleep(60)
        return 1.0

    t0 = time.monotonic()
    r = compute_rewards(fn, ["a", "hang", "b"], timeout_s=0.5)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.5, elapsed
    assert r.scores.tolist() == [1.0, 0.0, 1.0] and r.timeouts == 1 and r.failures == 0
    assert "timed out after 0.5s" in r.errors[0]


def test_hung_threads_do_not_take_worker_slots():
    # 3 hangs with 2 workers: abandoned threads free their slot, the 4th call still runs.
    def fn(response):
        if response == "hang":
            time.sleep(60)
        return 3.0

    t0 = time.monotonic()
    r = compute_rewards(fn, ["hang", "hang", "hang", "ok"], timeout_s=0.2, max_workers=2)
    assert time.monotonic() - t0 < 1.5
    assert r.scores.tolist() == [0.0, 0.0, 0.0, 3.0] and r.timeouts == 3


def test_async_functions_run_concurrently_and_time_out():
    async def fn(response):
        await asyncio.sleep(5.0 if response == "slow" else 0.2)
        if response == "err":
            raise ValueError("async bug")
        return 1.0

    t0 = time.monotonic()
    r = compute_rewards(fn, ["x"] * 8)
    assert time.monotonic() - t0 < 1.0
    assert r.scores.tolist() == [1.0] * 8

    r = compute_rewards(fn, ["x", "slow", "err"], timeout_s=0.5)
    assert r.scores.tolist() == [1.0, 0.0, 0.0] and r.timeouts == 1 and r.failures == 1

    async def inside_loop():  # also works when the caller already runs an event loop
        return compute_rewards(fn, ["x", "x"])

    assert asyncio.run(inside_loop()).scores.tolist() == [1.0, 1.0]


def test_async_compute_score_class():
    class Judge:
        async def __call__(self, data_source, solution_str, ground_truth, extra_info):
            await asyncio.sleep(0.01)
            return float(solution_str.endswith(ground_truth))

    r = compute_rewards(Judge(), ["a 1", "a 2"], [{"ground_truth": "1"}] * 2)
    assert RewardFunction(Judge()).is_async and r.scores.tolist() == [1.0, 0.0]


def test_rule_based_reward_dispatch():
    samples = [
        {"data_source": "openai/gsm8k", "reward_model": {"ground_truth": "72"}},
        {"data_source": "lighteval/MATH", "reward_model": {"ground_truth": r"\frac{1}{2}"}},
        {"data_source": "math", "reward_model": {"ground_truth": "3"}},
        {"data_source": "my/unknown", "reward_model": {"ground_truth": "3"}},
    ]
    responses = ["#### 72", r"$\boxed{0.5}$", r"$\boxed{4}$", "3"]
    r = compute_rewards(RuleBasedReward(), responses, samples)
    assert r.scores.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert r.failures == 1 and "my/unknown" in r.errors[0]
    with pytest.raises(ValueError, match="my/unknown"):
        RuleBasedReward()("my/unknown", "x", "y")
    custom = RuleBasedReward({"my/unknown": lambda s, gt: float(s == gt)})
    assert compute_rewards(custom, responses, samples).scores.tolist() == [1.0, 1.0, 0.0, 1.0]


def test_bad_arguments():
    with pytest.raises(ValueError, match="2 responses but 1 samples"):
        compute_rewards(lambda r: 1.0, ["a", "b"], [{}])
    with pytest.raises(ValueError, match="callable"):
        RewardFunction(3)


def test_failure_guard_stops_after_consecutive_failed_steps():
    from verl_mega.rewards.base import RewardFailureError, RewardFailureGuard

    guard = RewardFailureGuard(threshold=1.0, steps=3)
    guard.update(8, 8)
    guard.update(8, 8)
    guard.update(7, 8)  # one success resets the count
    assert guard.bad_in_a_row == 0
    guard.update(8, 8)
    guard.update(8, 8)
    with pytest.raises(RewardFailureError, match=r"8/8 calls .* for 3 steps in a row .*first failure: sample 0: boom"):
        guard.update(8, 8, ["sample 0: boom"])
    half = RewardFailureGuard(threshold=0.5, steps=1)
    half.update(3, 8)
    with pytest.raises(RewardFailureError, match="reward_fail_threshold=0.5"):
        half.update(4, 8)
    never = RewardFailureGuard(steps=0)
    for _ in range(10):
        never.update(8, 8)
    with pytest.raises(ValueError, match="reward_fail_threshold"):
        RewardFailureGuard(threshold=0.0)


def test_rule_reward_checks_data_sources():
    rule = RuleBasedReward()
    rule.check_data_sources(["openai/gsm8k", "math", "gsm8k"])
    with pytest.raises(ValueError, match=r"data_source 'arith', None.*known data sources: \[.*'openai/gsm8k'"):
        rule.check_data_sources(["gsm8k", "arith", None, "arith"], where="train.jsonl")


def test_extra_means_and_the_fallback_share():
    """Numeric extras average over the rows that report them (text left out); a FallbackReward marks every row, so
    the mean of `fallback` is the share the model scored (here 1 of 3: the row whose data_source has no rule)."""
    from verl_mega.rewards import FallbackReward, RuleBasedReward
    from verl_mega.rewards.base import extra_means

    assert extra_means([{"acc": 1.0, "note": "x"}, {"acc": 0.0}, {}]) == {"reward/extra/acc": 0.5}
    samples = [{"data_source": "gsm8k", "ground_truth": "4"}, {"data_source": "gsm8k", "ground_truth": "5"},
               {"data_source": "unknown", "ground_truth": "1"}]
    res = FallbackReward(RuleBasedReward(), lambda response: 0.5).score_batch(samples, ["#### 4", "#### 4", "1"])
    assert res.scores.tolist() == [1.0, 0.0, 0.5]
    assert extra_means(res.extras) == {"reward/extra/fallback": 1 / 3}
