"""PPO-family losses on token tensors: clipped policy loss (clip-higher, dual-clip), clipped value loss,
entropy bonus, and the loss aggregation modes.

References: Schulman et al. 2017 (PPO clipped surrogate); Ye et al. 2020 (dual-clip PPO, "Mastering
Complex Control in MOBA Games"); Yu et al. 2025 (DAPO: decoupled clip_low / clip_high, token-level
mean); verl `trainer/ppo/core_algos.py` (`compute_policy_loss_vanilla`, `compute_value_loss`,
`agg_loss`), whose semantics these follow.

All inputs are [B, T] over response tokens with a 0/1 `mask`; every function returns a 0-dim tensor
(autograd-connected to its inputs) and detached 0-dim tensors for statistics.

Data parallel / micro-batches: by default a loss is a mean over the tokens (or sequences) of the
tensors given. Pass `denominator` (the global number of valid tokens, or of sequences for the
seq-mean modes) to get `sum / denominator` instead, so that summing the losses of all micro-batches
and all DP ranks gives exactly the global-batch mean.
"""

from __future__ import annotations

import torch

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
LOG_RATIO_CLAMP = 20.0  # verl clamps log(pi/pi_old) to +-20 before exp


def aggregate_loss(
    loss_mat: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", denominator: float | None = None
) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    token-mean:          sum_{b,t} L*m / sum_{b,t} m                      (DAPO; each token weighs the same)
    seq-mean-token-sum:  mean_b sum_t L*m                                 (Dr. GRPO style, no length norm)
    seq-mean-token-mean: mean_b (sum_t L*m / sum_t m)                     (original GRPO)
    The seq means run over sequences with at least one valid token. With `denominator`, the mean's
    divisor (tokens, or sequences) is replaced by it (see module docstring). An all-zero mask gives 0.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"unknown loss aggregation {mode!r}; valid: {AGG_MODES}")
    if loss_mat.shape != mask.shape:
        raise ValueError(f"loss {tuple(loss_mat.shape)} and mask {tuple(mask.shape)} shapes differ")
    mask = mask.to(loss_mat.dtype)
    masked = loss_mat * mask
    if mode == "token-mean":
        return masked.sum() / (denominator if denominator is not None else mask.sum().clamp(min=1))
    tokens = mask.sum(-1)  # [B]
    seq = masked.sum(-1)  # [B]
    if mode == "seq-mean-token-mean":
        seq = seq / tokens.clamp(min=1)
    n_seq = denominator if denominator is not None else (tokens > 0).sum().clamp(min=1)
    return seq.sum() / n_seq


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Detached token mean for statistics."""
    return aggregate_loss(x.detach().float(), mask, "token-mean")


def policy_loss(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    denominator: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate with decoupled clip range and optional dual clip.

    r = exp(logprob - old_logprob)   (log-ratio clamped to +-20)
    L = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))
    dual clip (c = dual_clip > 1), for A < 0 only:  L = min(L, -A c)   (bounds the loss of a huge ratio)
    loss = aggregate_loss(L, mask, agg)

    Args: logprob [B, T] (with grad), old_logprob [B, T], advantages [B, T], mask [B, T].
    Returns: (loss, stats) with stats (detached token means):
        clipfrac      fraction of tokens where the clipped term is active (-A clip(r) > -A r)
        approx_kl     k1 estimate of KL(old || new): mean(old_logprob - logprob)
        approx_kl_k3  k3 estimate: mean((r - 1) - log r)  (non-negative, lower variance)
        dual_clipfrac fraction of tokens with A < 0 where the dual clip is active (0 without dual clip)
    """
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (e.g. 3.0), got {dual_clip}")
    log_ratio = (logprob - old_logprob).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss_mat = torch.maximum(unclipped, clipped)
    stats = {
        "clipfrac": _masked_mean((clipped > unclipped).float(), mask),
        "approx_kl": _masked_mean(-log_ratio, mask),
        "approx_kl_k3": _masked_mean(ratio - 1.0 - log_ratio, mask),
        "dual_clipfrac": torch.zeros(()),
    }
    if dual_clip is not None:
        bound = -advantages * dual_clip
        negative = advantages < 0
        stats["dual_clipfrac"] = _masked_mean(((loss_mat > bound) & negative).float(), mask)
        loss_mat = torch.where(negative, torch.minimum(loss_mat, bound), loss_mat)
    return aggregate_loss(loss_mat, mask, agg, denominator), stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float | None = 0.2,
    agg: str = "token-mean",
    denominator: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (verl / PPO2 semantics).

    v_clip = old_values + clip(values - old_values, -clip, clip)
    L = 0.5 * max((values - returns)^2, (v_clip - returns)^2);  loss = aggregate_loss(L, mask, agg)
    `clip=None` gives the plain 0.5 * (values - returns)^2.

    Args: values [B, T] (with grad), old_values [B, T] (rollout-time critic), returns [B, T], mask [B, T].
    Returns: (loss, clipfrac) - clipfrac: fraction of tokens where the clipped error is the larger.
    """
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * aggregate_loss(unclipped, mask, agg, denominator), torch.zeros(())
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (v_clipped - returns) ** 2
    loss = 0.5 * aggregate_loss(torch.maximum(unclipped, clipped), mask, agg, denominator)
    return loss, _masked_mean((clipped > unclipped).float(), mask)


def entropy_bonus(
    entropy: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean", denominator: float | None = None
) -> torch.Tensor:
    """Aggregated token entropy H [B, T] -> scalar; the actor loss is `policy_loss - coef * entropy_bonus`."""
    return aggregate_loss(entropy, mask, agg, denominator)
