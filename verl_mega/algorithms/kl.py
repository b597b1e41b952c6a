"""KL between the actor and the reference policy: per-token estimators, coefficient controllers,
the in-reward KL penalty (PPO-RLHF) and the KL loss term (GRPO).

References: Schulman, "Approximating KL Divergence" (2020, http://joschu.net/blog/kl-approx.html) for
k1/k2/k3; Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") for the adaptive
coefficient; verl `trainer/ppo/core_algos.py` (`kl_penalty`, `AdaptiveKLController`) and
`ray_trainer.apply_kl_penalty`, whose semantics these follow.

With log r = ref_logprob - logprob on tokens sampled from the actor, KL(actor || ref) is estimated per token by
    k1  = logprob - ref_logprob                 (unbiased, can be negative)
    abs = |logprob - ref_logprob|
    k2  = 0.5 (logprob - ref_logprob)^2         (verl's "mse")
    k3  = (r - 1) - log r  = exp(log r) - log r - 1   (unbiased, >= 0, low variance; verl's "low_var_kl")
As in verl, k3 / low_var_kl clamp log r to [-20, 20] and the result to [-10, 10].
"""

from __future__ import annotations

import math

import torch

from verl_mega.algorithms.losses import aggregate_loss

KL_KINDS = ("k1", "kl", "abs", "k2", "mse", "k3", "low_var_kl")


def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL estimate [B, T] of the actor against the reference (see module docstring)."""
    diff = logprob - ref_logprob
    if kind in ("k1", "kl"):
        return diff
    if kind == "abs":
        return diff.abs()
    if kind in ("k2", "mse"):
        return 0.5 * diff.square()
    if kind in ("k3", "low_var_kl"):
        log_r = (-diff).clamp(-20.0, 20.0)
        return (torch.exp(log_r) - log_r - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"unknown KL estimator {kind!r}; valid: {KL_KINDS}")


class FixedKLController:
    """A constant KL coefficient (`value`); `update` does nothing."""

    def __init__(self, coef: float):
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. adaptive KL coefficient: steer the measured KL towards `target`.

    e = clip(current_kl / target - 1, -0.2, 0.2);   value <- value * (1 + e * n_steps / horizon)
    """

    def __init__(self, init_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value, self.target, self.horizon = float(init_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adjust `value` after a batch of `n_steps` samples whose mean KL was `current_kl`."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def apply_kl_penalty(
    token_level_scores: torch.Tensor,
    logprob: torch.Tensor,
    ref_logprob: torch.Tensor,
    mask: torch.Tensor,
    coef: float,
    kind: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Subtract the KL penalty from token rewards (PPO-RLHF's in-reward KL).

    rewards[b, t] = scores[b, t] - coef * kl[b, t] * mask[b, t]
    kl_mean       = mean_b ( sum_t kl*mask / sum_t mask )   (per-sequence mean, then batch mean, as verl)

    Args: token_level_scores, logprob (rollout actor), ref_logprob, mask: [B, T]; coef: float
    (e.g. a controller's `.value`; feed kl_mean back with `controller.update(kl_mean, B)`).
    Returns: (token_rewards [B, T], kl_mean 0-dim detached).
    """
    if not math.isfinite(coef):
        raise ValueError(f"KL coefficient must be finite, got {coef}")
    kl = kl_penalty(logprob, ref_logprob, kind) * mask
    per_seq = kl.sum(-1) / mask.sum(-1).clamp(min=1)  # [B]
    return token_level_scores - coef * kl, per_seq.mean().detach()


def kl_loss(
    logprob: torch.Tensor,
    ref_logprob: torch.Tensor,
    mask: torch.Tensor,
    kind: str = "low_var_kl",
    agg: str = "token-mean",
    denominator: float | None = None,
) -> torch.Tensor:
    """KL-to-reference loss term (GRPO): aggregate_loss(kl_penalty(logprob, ref_logprob, kind), mask, agg)."""
    return aggregate_loss(kl_penalty(logprob, ref_logprob, kind), mask, agg, denominator)
