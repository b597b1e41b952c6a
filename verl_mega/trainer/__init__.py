"""verl_mega.trainer: PPOTrainer (PPO/GRPO/RLOO/REINFORCE++) over dataflow stages composed with `>>`,
TrainEngine (1F1B, DP, ZeRO-1), checkpoints, the `verl-mega train` / `verl-mega demo` commands.

    from verl_mega.trainer import PPOTrainer, Rollout, Reward, LogProbs, Advantage, Update, Metrics
    trainer = PPOTrainer(actor=actor, reward_fn=fn, rollout_batch_size=8, algorithm="grpo")
    trainer.pipeline = default_pipeline(trainer).replace("reward", my_reward_stage)   # stages compose with >>

Names are imported on first use (PEP 562), so `verl-mega demo`'s launcher process, which only
spawns the ranks, does not pay for torch/megatron imports twice.
"""

import importlib

_EXPORTS = {
    "RLBatch": "verl_mega.trainer.batch",
    "TrainerConfig": "verl_mega.trainer.config",
    "PPOTrainer": "verl_mega.trainer.ppo_trainer",
    "default_pipeline": "verl_mega.trainer.ppo_trainer",
    **{name: "verl_mega.trainer.stages" for name in
       ("Advantage", "LogProbs", "Metrics", "Pipeline", "Reward", "Rollout", "Stage", "Update")},
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'verl_mega.trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return __all__
