"""Batched rewards: one call scores a whole batch (reward models, LLM judges), and their combinations.

Protocol: a `BatchedReward` has `score_batch(samples, responses, *, timeout_s=None) -> RewardResult`.
A *collective* one (`collective = True`: a sharded model) must be called by every rank of its
model-parallel group with the same rows; the trainer's Reward stage then calls it on every rank
instead of on the first rank only (`is_collective`). `score_rewards` is the one entry point for any
reward: a BatchedReward is asked for the batch, anything else goes through `compute_rewards`
(per response, with the failure / timeout accounting).

Combinations (each part may be a plain function or a BatchedReward):
- `CombinedReward([r1, r2], weights=[w1, w2])`: score = sum_k w_k * score_k; failures, timeouts and
  error messages of the parts add up (a sample whose part failed gets 0 from that part).
- `FallbackReward(rule, model)`: the rule's score where the rule succeeds; where it raises (e.g. an
  unknown data_source or no ground truth) or times out, the model's score. Only those samples are
  sent to the model; their rule failures are not counted (the fallback handled them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from verl_mega.rewards.base import RewardFunction, RewardResult, compute_rewards

_RULE_OK = "_rule_ok"  # marker key a FallbackReward's wrapped rule adds to a successful result


class BatchedReward:
    """Base class of rewards that score a batch at once. Subclasses implement `score_batch` and set
    `collective` when every rank of a model-parallel group must call it together."""

    collective: bool = False

    def score_batch(self, samples: Sequence[dict], responses: Sequence[str], *,
                    timeout_s: float | None = None) -> RewardResult:
        """Scores [B] of `responses[i]` for `samples[i]` (dataset items) with failure counts."""
        raise NotImplementedError

    def __call__(self, response: str, sample: dict | None = None) -> float:
        """Score one response (a batch of one; collective like score_batch). A failure scores 0."""
        return float(self.score_batch([sample or {}], [response]).scores[0])


def as_batched(fn) -> BatchedReward | None:
    """The BatchedReward behind `fn` (unwrapping a RewardFunction), or None for a per-response function."""
    fn = fn.fn if isinstance(fn, RewardFunction) else fn
    return fn if isinstance(fn, BatchedReward) else None


def is_collective(fn) -> bool:
    """True when `fn` is a collective BatchedReward (every rank of its model-parallel group calls it)."""
    batched = as_batched(fn)
    return batched is not None and batched.collective


def score_rewards(fn, responses: Sequence[str], samples: Sequence[dict] | None = None,
                  timeout_s: float | None = 30.0) -> RewardResult:
    """Score a batch with any reward: `fn.score_batch` for a BatchedReward, else `compute_rewards`."""
    samples = list(samples) if samples is not None else [{} for _ in responses]
    if len(samples) != len(responses):
        raise ValueError(f"got {len(responses)} responses but {len(samples)} samples")
    batched = as_batched(fn)
    if batched is not None:
        return batched.score_batch(samples, list(responses), timeout_s=timeout_s)
    return compute_rewards(fn, responses, samples, timeout_s=timeout_s)


class CombinedReward(BatchedReward):
    """Weighted sum of rewards: score = sum_k weights[k] * score_k (weights default to 1 each)."""

    def __init__(self, rewards: Sequence[Callable], weights: Sequence[float] | None = None):
        rewards = list(rewards)
        if not rewards:
            raise ValueError("CombinedReward needs at least one reward")
        weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        if len(weights) != len(rewards):
            raise ValueError(f"CombinedReward: {len(rewards)} rewards but {len(weights)} weights")
        self.rewards, self.weights = rewards, weights
        self.collective = any(is_collective(r) for r in rewards)

    def score_batch(self, samples, responses, *, timeout_s=None) -> RewardResult:
        total = torch.zeros(len(responses), dtype=torch.float32)
        out = RewardResult(total, extras=[{} for _ in responses])
        for k, (reward, weight) in enumerate(zip(self.rewards, self.weights)):
            res = score_rewards(reward, responses, samples, timeout_s)
            total += weight * res.scores
            out.failures += res.failures
            out.timeouts += res.timeouts
            out.errors += [f"reward {k}: {e}" for e in res.errors]
            for extra, part, score in zip(out.extras, res.extras, res.scores.tolist()):
                extra.update({f"{key}_{k}": v for key, v in part.items()}, **{f"score_{k}": score})
        return out


class FallbackReward(BatchedReward):
    """The rule's score where the rule succeeds, the model's where the rule raises or times out."""

    def __init__(self, rule: Callable, model: Callable):
        self.rule = RewardFunction(rule)
        self.model = model
        self.collective = is_collective(model)

    def _marked_rule(self) -> RewardFunction:
        """The rule returning {"score", _RULE_OK} on success, so failed / timed-out samples are told apart."""
        rule = self.rule

        def mark(value):
            return {**value, _RULE_OK: True} if isinstance(value, dict) else {"score": value, _RULE_OK: True}

        # the compute_score form receives what `rule` itself needs (RewardFunction.verl_args of the sample)
        def call(data_source, solution_str, ground_truth, extra_info):
            sample = {"data_source": data_source, "ground_truth": ground_truth, "extra_info": extra_info}
            return rule(solution_str, sample)

        if rule.is_async:
            async def marked(data_source, solution_str, ground_truth, extra_info):
                return mark(await call(data_source, solution_str, ground_truth, extra_info))
        else:
            def marked(data_source, solution_str, ground_truth, extra_info):
                return mark(call(data_source, solution_str, ground_truth, extra_info))
        return RewardFunction(marked)

    def score_batch(self, samples, responses, *, timeout_s=None) -> RewardResult:
        res = score_rewards(self._marked_rule(), responses, samples, timeout_s)
        ok = [bool(e.pop(_RULE_OK, False)) for e in res.extras]
        for extra, good in zip(res.extras, ok):
            extra["fallback"] = not good  # every row says: the mean (reward/extra/fallback) is the model's share
        todo = [i for i, good in enumerate(ok) if not good]
        # a collective model is called by every rank even with nothing to score, so the ranks stay in step
        if todo or self.collective:
            fallback = score_rewards(self.model, [responses[i] for i in todo], [samples[i] for i in todo], timeout_s)
            for j, i in enumerate(todo):
                res.scores[i] = fallback.scores[j]
                res.extras[i] = {**fallback.extras[j], "fallback": True}
            res.failures, res.timeouts = fallback.failures, fallback.timeouts
            res.errors = [f"fallback: {e}" for e in fallback.errors]
        return res
