"""Rewards: rule checkers (GSM8K, boxed math), user reward functions with failure/timeout accounting, a code sandbox."""

from verl_mega.rewards.base import RewardFunction, RewardResult, RuleBasedReward, compute_rewards
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

__all__ = [
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
