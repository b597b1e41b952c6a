"""Optimizer configuration and learning-rate schedule (linear warm-up, then constant or cosine).

`OptimConfig` is what the trainer's YAML `optim:` section maps to. The schedule is a
`torch.optim.lr_scheduler.LambdaLR` factor:

    step < warmup_steps:  (step + 1) / warmup_steps
    constant:             1
    cosine:               min_lr/lr + (1 - min_lr/lr) * 0.5 * (1 + cos(pi * progress)),
                          progress = (step - warmup_steps) / (total_steps - warmup_steps), clipped to [0, 1]

Reference: Loshchilov & Hutter, "SGDR" (2017) for the cosine shape; Megatron's OptimizerParamScheduler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

SCHEDULES = ("constant", "cosine")


@dataclass
class OptimConfig:
    """AdamW + LR schedule + gradient clipping. The RL config's `optim:` section (the actor's optimizer);
    `critic_optim:` is a `CriticOptimConfig`. Defaults are verl's actor.optim ones except weight decay."""

    lr: float = 1e-6  # peak learning rate
    betas: Tuple[float, float] = (0.9, 0.999)  # Adam beta1, beta2
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.0  # decoupled weight decay (matrices only; biases and norms get none)
    warmup_steps: int = 0  # linear warm-up length in optimizer steps
    schedule: str = "constant"  # after warm-up: constant | cosine
    min_lr: float = 0.0  # cosine floor
    total_steps: Optional[int] = None  # cosine horizon in optimizer steps; null = the RL run's length (the trainer derives it)
    clip_grad: float = 1.0  # max global grad norm; <= 0 disables clipping (the norm is still reported)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.check(type(self).__name__)

    def check(self, name: str) -> None:
        """ValueError naming `name` (e.g. "optim", the config key) for values out of range."""
        if self.lr <= 0:
            raise ValueError(f"{name}.lr must be positive, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{name}.schedule {self.schedule!r} is not one of {SCHEDULES}")
        if self.warmup_steps < 0:
            raise ValueError(f"{name}.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.total_steps is not None and self.schedule == "cosine" and self.total_steps <= self.warmup_steps:
            raise ValueError(f"{name}.total_steps={self.total_steps} must exceed warmup_steps="
                             f"{self.warmup_steps} for the cosine schedule")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"{name}.min_lr={self.min_lr} must be in [0, lr={self.lr}]")


@dataclass
class CriticOptimConfig(OptimConfig):
    """The critic's optimizer (PPO): an OptimConfig with verl's critic learning rate."""

    lr: float = 1e-5  # critic peak learning rate


def lr_factor(config: OptimConfig, step: int) -> float:
    """Multiplier of config.lr for optimizer step `step` (0-based)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / (config.total_steps - config.warmup_steps))
    floor = config.min_lr / config.lr
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_adamw(params: list[torch.Tensor], config: OptimConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """torch AdamW over `params` (fp32 master tensors): weight decay on matrices only. fused: torch's
    fused kernel (None: on CUDA only; True also on the CPU, ~4x the for-loop step there)."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": config.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    fused = (bool(params) and all(p.is_cuda for p in params)) if fused is None else fused and bool(params)
    if not groups:  # a rank that owns no parameter still needs an optimizer object
        groups = [{"params": [torch.zeros(1, requires_grad=True)], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused or None)


def make_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying `lr_factor`. A cosine schedule needs `config.total_steps` (ValueError otherwise)."""
    if config.schedule == "cosine" and config.total_steps is None:
        raise ValueError("OptimConfig.total_steps is required for the cosine schedule (the horizon in optimizer steps)")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step))


def set_schedule_step(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                      config: OptimConfig, step: int) -> None:
    """Put the schedule at optimizer step `step` (after loading a checkpoint): sets every group's lr."""
    scheduler.last_epoch = step
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lr_factor(config, step)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
