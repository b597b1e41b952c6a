"""Rewards: rule checkers (GSM8K, boxed math, Geometry3K), user reward functions with failure/timeout accounting,
a code sandbox, the batched-reward protocol and combinations (weighted sum, rule first with a fallback). The model
rewards (`RewardModel`, `LLMJudgerReward`) live in `verl_mega.model_rewards`, a layer above (they load models)."""

from verl_mega.rewards.base import RewardFunction, RewardResult, RuleBasedReward, compute_rewards
from verl_mega.rewards.batched import BatchedReward, CombinedReward, FallbackReward, is_collective, score_rewards
from verl_mega.rewards.math import (
    extract_gsm8k_answer,
    geo3k_compute_score,
    gsm8k_compute_score,
    is_equiv,
    last_boxed_only_string,
    math_compute_score,
    normalize_final_answer,
    remove_boxed,
)
from verl_mega.rewards.sandbox import SandboxResult, code_compute_score, extract_code, run_tests

__all__ = [
    "BatchedReward",
    "CombinedReward",
    "FallbackReward",
    "is_collective",
    "score_rewards",
    "RewardFunction",
    "RewardResult",
    "RuleBasedReward",
    "compute_rewards",
    "extract_gsm8k_answer",
    "geo3k_compute_score",
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
