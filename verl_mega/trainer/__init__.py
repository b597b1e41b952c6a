"""verl_mega.trainer: PPOTrainer (PPO/GRPO/RLOO/REINFORCE++) over dataflow stages composed with `>>`,
TrainEngine (1F1B, DP, ZeRO-1), checkpoints, the `verl-mega train` / `verl-mega demo` commands.

    from verl_mega.trainer import PPOTrainer, Rollout, Reward, LogProbs, Advantage, Update, Metrics
    trainer = PPOTrainer(actor=actor, reward_fn=fn, rollout_batch_size=8, algorithm="grpo")
    trainer.pipeline = Rollout() >> Reward() >> LogProbs() >> Advantage() >> Update() >> Metrics()
"""

from verl_mega.trainer.batch import RLBatch
from verl_mega.trainer.config import TrainerConfig
from verl_mega.trainer.ppo_trainer import PPOTrainer, default_pipeline
from verl_mega.trainer.stages import Advantage, LogProbs, Metrics, Pipeline, Reward, Rollout, Stage, Update

__all__ = [
    "Advantage", "LogProbs", "Metrics", "PPOTrainer", "Pipeline", "RLBatch", "Reward", "Rollout", "Stage",
    "TrainerConfig", "Update", "default_pipeline",
]
