"""Rewards: rule checkers (GSM8K, boxed math), user reward functions with failure/timeout accounting, a code sandbox,
batched model rewards (a sharded reward model, an LLM judge) and their combinations.

The model rewards (`RewardModel`, `LLMJudgerReward`) are imported lazily on first access: they pull in
the model and rollout packages (megatron-core), which the light users of this package (rule
rewards, the sandbox server) do not need, and which may themselves import `verl_mega.rewards`.
"""

from verl_mega.rewards.base import RewardFunction, RewardResult, RuleBasedReward, compute_rewards
from verl_mega.rewards.batched import BatchedReward, CombinedReward, FallbackReward, is_collective, score_rewards
from verl_mega.rewards.math import (
    extract_gsm8k_answer,
    gsm8k_compute_score,
    is_equiv,
    last_boxed_only_string,
    math_compute_score,
    normalize_final_answer,
    remove_boxed,
)
from verl_mega.rewards.sandbox import SandboxResult, code_compute_score, extract_code, run_tests

_LAZY = {"RewardModel": "verl_mega.rewards.model", "LLMJudgerReward": "verl_mega.rewards.judge"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'verl_mega.rewards' has no attribute {name!r}")


__all__ = [
    "BatchedReward",
    "CombinedReward",
    "FallbackReward",
    "LLMJudgerReward",
    "RewardModel",
    "is_collective",
    "score_rewards",
    "RewardFunction",
    "RewardResult",
    "RuleBasedReward",
    "compute_rewards",
    "extract_gsm8k_answer",
    "gsm8k_compute_score",
    "is_equiv",
    "last_boxed_only_string",
    "math_compute_score",
    "normalize_final_answer",
    "remove_boxed",
    "SandboxResult",
    "code_compute_score",
    "extract_code",
    "run_tests",
]
