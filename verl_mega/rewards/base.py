"""Reward functions: one calling convention for user callables, and a batch runner that never crashes.

A user gives either
  - `reward_fn(response: str) -> float`                         (the README's simplest form), or
  - verl's `compute_score(data_source, solution_str, ground_truth, extra_info) -> float | dict(score=...)`,
    detected by its signature (any of those parameter names, or two or more positional parameters),
  - or an `async def` version of either (awaited concurrently with `asyncio.gather`).
`RewardFunction` wraps any of them; `compute_rewards` scores a batch.

Robustness (a reward bug must not kill a long RL run): an exception, a non-number or NaN result
scores 0 and is counted as a failure (first few messages kept); a call past `timeout_s` scores 0 and
is counted as a timeout. Sync functions run in daemon threads that are abandoned on timeout, so a hung
function blocks neither the step nor interpreter exit (its thread lives on until it returns; Python
cannot kill a thread - use `rewards.sandbox` for untrusted code). Async functions are cancelled with
`asyncio.wait_for`; an async function that blocks its event loop (e.g. `time.sleep`) cannot be
timed out.

A reward that fails on (nearly) every call is a broken run, not noise: `RewardFailureGuard` stops
training with `RewardFailureError` once the failed fraction of a step reaches a threshold for a
number of steps in a row (config `trainer.reward_fail_threshold` / `trainer.reward_fail_steps`), and
`RuleBasedReward.check_data_sources` rejects a dataset whose data_sources it has no checker for
before any model is loaded.

Reference: verl's `NaiveRewardManager` / `default_compute_score` (dispatch on `data_source`).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import numbers
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from verl_mega.rewards.math import geo3k_compute_score, gsm8k_compute_score, math_compute_score

_VERL_PARAMS = ("data_source", "solution_str", "ground_truth", "extra_info")
MAX_ERROR_MESSAGES = 5


def _is_async(fn: Callable) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


class RewardFunction:
    """A user reward callable normalised to `fn(response, sample) -> float | dict | awaitable`.

    `sample` is a dataset item (or any dict) with optional `data_source`, `ground_truth` (or
    `reward_model.ground_truth`) and `extra_info`; these feed the compute_score form.
    """

    def __init__(self, fn: Callable):
        if isinstance(fn, RewardFunction):
            fn = fn.fn
        if not callable(fn):
            raise ValueError(f"reward function must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.is_async = _is_async(fn)
        params = inspect.signature(fn).parameters
        self._accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
        self._names = [n for n in _VERL_PARAMS if n in params]
        positional = [p for p in params.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        required = [p for p in positional if p.default is p.empty]
        self._n_positional = len(positional)
        self.style = "compute_score" if self._names or len(required) >= 2 else "response"

    @staticmethod
    def verl_args(response: str, sample: dict) -> dict[str, Any]:
        """The four compute_score arguments of one sample."""
        reward_model = sample.get("reward_model") or {}
        truth = sample.get("ground_truth", reward_model.get("ground_truth"))
        return dict(
            data_source=sample.get("data_source"),
            solution_str=response,
            ground_truth=truth,
            extra_info=sample.get("extra_info") or {},
        )

    def __call__(self, response: str, sample: dict | None = None):
        """Call the wrapped function on one response (returns an awaitable when it is async)."""
        if self.style == "response":
            return self.fn(response)
        args = self.verl_args(response, sample or {})
        if len(self._names) == len(_VERL_PARAMS) or self._accepts_kwargs:
            return self.fn(**args)
        if self._names:  # e.g. compute_score(solution_str, ground_truth)
            return self.fn(**{k: args[k] for k in self._names})
        return self.fn(*list(args.values())[: self._n_positional])


@dataclass
class RewardResult:
    """Scores of a batch and what went wrong while computing them."""

    scores: torch.Tensor  # [B] float32; 0 where a call failed or timed out
    failures: int = 0  # calls that raised or returned a non-number / NaN
    timeouts: int = 0  # calls that ran past timeout_s
    errors: list[str] = field(default_factory=list)  # first few failure/timeout messages
    extras: list[dict] = field(default_factory=list)  # per sample: the non-score keys of a dict result


def extra_means(extras: Sequence[dict], prefix: str = "reward/extra/") -> dict[str, float]:
    """Mean of each numeric extra key over the samples that report it (verl's reward_extra_info as metrics):
    extras [N] dicts (`RewardResult.extras`) -> {prefix + key: mean}; non-numeric and NaN values are left out
    (e.g. a combination's `score_0`, `score_1`, a rule's `acc`, the share of a fallback's rows the model scored)."""
    sums: dict[str, list[float]] = {}
    for extra in extras:
        for key, value in extra.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, numbers.Real) and not math.isnan(float(value)):
                total = sums.setdefault(key, [0.0, 0])
                total[0] += float(value)
                total[1] += 1
    return {prefix + key: total / count for key, (total, count) in sums.items()}


def _to_score(value: Any) -> tuple[float, dict]:
    """float(score) and the extra keys of a result; ValueError for a non-number or NaN."""
    extra: dict = {}
    if isinstance(value, dict):
        if "score" not in value:
            raise ValueError(f"reward dict has no 'score' key (keys: {sorted(value)})")
        extra = {k: v for k, v in value.items() if k != "score"}
        value = value["score"]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not isinstance(value, numbers.Real):  # int, float, bool, numpy scalars
        raise ValueError(f"reward must be a number, got {type(value).__name__}: {value!r:.80}")
    score = float(value)
    if math.isnan(score):
        raise ValueError("reward is NaN")
    return score, extra


class _Collector:
    """Accumulates per-sample outcomes into a RewardResult."""

    def __init__(self, n: int):
        self.scores = [0.0] * n
        self.extras: list[dict] = [{} for _ in range(n)]
        self.failures = self.timeouts = 0
        self.errors: list[str] = []

    def _note(self, msg: str) -> None:
        if len(self.errors) < MAX_ERROR_MESSAGES:
            self.errors.append(msg)

    def ok(self, i: int, value: Any) -> None:
        try:
            self.scores[i], self.extras[i] = _to_score(value)
        except (ValueError, TypeError) as e:
            self.failures += 1
            self._note(f"sample {i}: {e}")

    def error(self, i: int, exc: BaseException) -> None:
        self.failures += 1
        self._note(f"sample {i}: {type(exc).__name__}: {exc}")

    def timeout(self, i: int, timeout_s: float) -> None:
        self.timeouts += 1
        self._note(f"sample {i}: timed out after {timeout_s:g}s")

    def result(self) -> RewardResult:
        return RewardResult(
            torch.tensor(self.scores, dtype=torch.float32), self.failures, self.timeouts, self.errors, self.extras
        )


def _run_sync(fn: RewardFunction, calls: list[tuple], col: _Collector, timeout_s: float | None, max_workers: int):
    """Run calls in daemon threads, at most `max_workers` live (abandoned hung ones don't count)."""
    done: queue.Queue = queue.Queue()

    def work(i: int, response: str, sample: dict) -> None:
        try:
            done.put((i, True, fn(response, sample)))
        except BaseException as e:  # noqa: BLE001 - any reward bug is a counted failure
            done.put((i, False, e))

    pending, active = deque(range(len(calls))), {}  # active: index -> deadline
    while pending or active:
        while pending and len(active) < max_workers:
            i = pending.popleft()
            threading.Thread(target=work, args=(i, *calls[i]), daemon=True, name=f"reward-{i}").start()
            active[i] = time.monotonic() + timeout_s if timeout_s is not None else math.inf
        wait = min(active.values()) - time.monotonic()
        try:
            i, ok, value = done.get(timeout=None if wait == math.inf else max(wait, 0.0))
            if active.pop(i, None) is not None:  # ignore late results of abandoned calls
                col.ok(i, value) if ok else col.error(i, value)
        except queue.Empty:
            pass
        now = time.monotonic()
        for i in [i for i, deadline in active.items() if deadline <= now]:
            del active[i]
            col.timeout(i, timeout_s)


async def _run_async(fn: RewardFunction, calls: list[tuple], col: _Collector, timeout_s: float | None, max_workers: int):
    limit = asyncio.Semaphore(max_workers)

    async def one(i: int, response: str, sample: dict) -> None:
        async with limit:
            try:
                col.ok(i, await asyncio.wait_for(fn(response, sample), timeout_s))
            except asyncio.TimeoutError:
                col.timeout(i, timeout_s)
            except Exception as e:  # noqa: BLE001
                col.error(i, e)

    await asyncio.gather(*(one(i, *c) for i, c in enumerate(calls)))


def compute_rewards(
    fn: Callable | RewardFunction,
    responses: Sequence[str],
    samples: Sequence[dict] | None = None,
    timeout_s: float | None = 30.0,
    max_workers: int = 32,
) -> RewardResult:
    """Score `responses[i]` (for `samples[i]`) with `fn`; never raises for a bug inside `fn`.

    Args:
        fn: any reward callable (see module docstring) or a RewardFunction.
        responses: B decoded response strings.
        samples: B dicts (dataset items) with data_source / ground_truth / extra_info; None = empty.
        timeout_s: per-call limit in seconds (None: no limit).
        max_workers: concurrent calls (threads for sync functions, coroutines for async ones).
    Returns:
        RewardResult with scores [B] float32 (0 for failed or timed-out calls) and the counts.
    """
    fn = RewardFunction(fn)
    samples = list(samples) if samples is not None else [{} for _ in responses]
    if len(samples) != len(responses):
        raise ValueError(f"got {len(responses)} responses but {len(samples)} samples")
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")
    calls, col = list(zip(responses, samples)), _Collector(len(responses))
    if fn.is_async:
        coro = _run_async(fn, calls, col, timeout_s, max_workers)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(coro)
        else:  # called from inside an event loop: run ours in a helper thread
            t = threading.Thread(target=asyncio.run, args=(coro,), daemon=True)
            t.start()
            t.join()
    else:
        _run_sync(fn, calls, col, timeout_s, max_workers)
    return col.result()


class RewardFailureError(RuntimeError):
    """Training stopped because the reward function failed on too many calls for too many steps."""


class RewardFailureGuard:
    """Counts consecutive steps whose failed fraction (failures + timeouts) / calls reaches `threshold`;
    `update` raises RewardFailureError on the `steps`-th such step in a row (steps = 0: never)."""

    def __init__(self, threshold: float = 1.0, steps: int = 3):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"trainer.reward_fail_threshold must be in (0, 1], got {threshold}")
        if steps < 0:
            raise ValueError(f"trainer.reward_fail_steps must be >= 0, got {steps}")
        self.threshold, self.steps = threshold, steps
        self.bad_in_a_row = 0

    def update(self, failed: int, calls: int, errors: Sequence[str] = ()) -> None:
        """Record one step: `failed` of `calls` reward calls failed or timed out; `errors` are example messages."""
        if calls <= 0 or failed / calls < self.threshold:
            self.bad_in_a_row = 0
            return
        self.bad_in_a_row += 1
        if self.steps and self.bad_in_a_row >= self.steps:
            first = errors[0] if errors else "no message"
            raise RewardFailureError(
                f"the reward failed on {failed}/{calls} calls ({failed / calls:.0%} >= trainer.reward_fail_threshold="
                f"{self.threshold:g}) for {self.bad_in_a_row} steps in a row (trainer.reward_fail_steps={self.steps}); "
                f"first failure: {first}. Fix the reward function (trainer.reward) or the data's data_source / "
                f"ground truth; set trainer.reward_fail_steps=0 to train on regardless")


# ---------------------------------------------------------------- rule-based rewards by data_source

GSM8K_SOURCES = ("openai/gsm8k", "gsm8k")
MATH_SOURCES = ("math", "lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500")
GEO3K_SOURCES = ("hiyouga/geometry3k",)  # verl's multimodal example (examples/data_preprocess/geo3k.py)


class RuleBasedReward:
    """verl-style `compute_score` dispatching on `data_source`: GSM8K exact match, boxed-math equivalence, or
    Geometry3K's boxed equivalence with a format bonus.

    `scorers` adds or overrides entries: `{data_source: fn(solution_str, ground_truth) -> float}`.
    An unknown data_source raises ValueError naming it (a counted failure inside compute_rewards).
    """

    def __init__(self, scorers: dict[str, Callable[[str, Any], float]] | None = None):
        self.scorers: dict[str, Callable[[str, Any], float]] = {s: gsm8k_compute_score for s in GSM8K_SOURCES}
        self.scorers.update({s: math_compute_score for s in MATH_SOURCES})
        self.scorers.update({s: geo3k_compute_score for s in GEO3K_SOURCES})
        self.scorers.update(scorers or {})

    def check_data_sources(self, sources: Iterable[str | None], where: str = "the dataset") -> None:
        """ValueError naming every data_source in `sources` that has no checker (and listing the known ones)."""
        unknown = sorted({repr(s) for s in sources if s not in self.scorers})
        if unknown:
            raise ValueError(f"{where} has rows with data_source {', '.join(unknown)}, for which the rule reward "
                             f"(trainer.reward=rule) has no checker; known data sources: {sorted(self.scorers)}. "
                             f"Set data_source in the data, or pass your own reward: trainer.reward=module:function "
                             f"or trainer.reward=file.py:function")

    def __call__(self, data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None) -> float:
        scorer = self.scorers.get(data_source)
        if scorer is None:
            raise ValueError(f"no rule-based reward for data_source {data_source!r}; known: {sorted(self.scorers)}")
        if ground_truth is None:
            raise ValueError(f"sample with data_source {data_source!r} has no ground_truth")
        return float(scorer(solution_str, ground_truth))
