"""RL math as pure tensor functions: PPO losses, KL estimators and controllers, advantage estimators."""

from verl_mega.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    gae,
    get_advantage_estimator,
    grpo,
    outcome_to_token_rewards,
    reinforce_plus_plus,
    reinforce_plus_plus_baseline,
    rloo,
)
from verl_mega.algorithms.kl import (
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty,
    kl_loss,
    kl_penalty,
)
from verl_mega.algorithms.losses import AGG_MODES, aggregate_loss, entropy_bonus, policy_loss, value_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGG_MODES",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate_loss",
    "apply_kl_penalty",
    "entropy_bonus",
    "gae",
    "get_advantage_estimator",
    "grpo",
    "kl_loss",
    "kl_penalty",
    "outcome_to_token_rewards",
    "policy_loss",
    "reinforce_plus_plus",
    "reinforce_plus_plus_baseline",
    "rloo",
    "value_loss",
]
