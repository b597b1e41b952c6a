"""Rewards computed by models: a sharded `RewardModel` (HF *ForSequenceClassification on the actor's
(tp, pp, dp) layout) and `LLMJudgerReward` (a frozen causal LM that generates a verdict on the rollout
engine). They implement `verl_mega.rewards.BatchedReward`, so they plug into `PPOTrainer(reward_fn=...)`
and combine with rule rewards (`CombinedReward`, `FallbackReward`).

Layer: this package sits between trainer and rollout (it loads models and generates with the rollout
engine); `verl_mega.rewards` (rule/function rewards, the batched protocol) imports nothing above it.
"""

from verl_mega.model_rewards.judge import LLMJudgerReward
from verl_mega.model_rewards.reward_model import RewardModel

__all__ = ["LLMJudgerReward", "RewardModel"]
