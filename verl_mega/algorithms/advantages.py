"""Advantage estimators: GAE, GRPO, RLOO, REINFORCE++, REINFORCE++-baseline, and a registry.

Each estimator takes token-level rewards [B, T] (an outcome reward is a reward on the last response
token; see `outcome_to_token_rewards`) and the response mask [B, T], and returns
(advantages [B, T], returns [B, T]), zero on padding. Outcome estimators use the per-sequence score
s_b = sum_t rewards[b, t] mask[b, t]. All share one keyword call so a trainer can pass the same arguments to
any of them (values, group_index / group_size, gamma, lam, norm_by_std, whiten, impl); each uses
the ones it needs and ignores the rest. `impl` ("auto" | "triton" | "torch") picks the kernel path.

The arithmetic lives in `verl_mega/kernels/advantage.py` (fused Triton kernels with a torch
reference); these are thin wrappers with the estimator's formula and verl's conventions. Group
sizes: with `group_size`, groups are contiguous (the n responses of a prompt sit together); with
`group_index`, any ids. Kernel conventions for a group of one: GRPO mean 0 / std 1 (the raw score,
as verl), RLOO 0, REINFORCE++-baseline baseline 0 (the raw score, then whitened over the batch, as verl);
`verl-mega train` refuses rollout.n_samples=1 for GRPO and RLOO (trainer.config.check_config).

References: Schulman et al. 2016 (GAE); Shao et al. 2024 (GRPO, DeepSeekMath); Ahmadian et al. 2024
(RLOO, "Back to Basics"); Hu 2025 (REINFORCE++); verl `trainer/ppo/core_algos.py`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from verl_mega.kernels import advantage as K


def outcome_to_token_rewards(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Place each sequence's outcome score on its last valid response token.

    scores [B], mask [B, T] -> token rewards [B, T] (zero elsewhere; zero row for an empty response).
    """
    mask = mask.to(torch.bool)
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & mask  # [B, T], true only at the last valid token
    return torch.where(last, scores.to(torch.float32)[:, None], torch.zeros((), dtype=torch.float32))


def _broadcast(per_seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, T]: the sequence's value on each valid token, 0 on padding."""
    return per_seq[:, None] * mask.to(per_seq.dtype)


def _scores(token_level_rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence outcome score s_b = sum_t rewards[b, t] * mask[b, t]   [B]."""
    return (token_level_rewards * mask).sum(-1)


def _check(token_level_rewards: torch.Tensor, mask: torch.Tensor) -> None:
    if token_level_rewards.dim() != 2 or token_level_rewards.shape != mask.shape:
        raise ValueError(
            f"token_level_rewards {tuple(token_level_rewards.shape)} and mask {tuple(mask.shape)} must both be [B, T]"
        )


def gae(token_level_rewards, mask, *, values=None, gamma=1.0, lam=1.0, whiten=True, dp_group=None, impl="auto",
        **unused):
    """Generalised advantage estimation (PPO with a critic).

    delta_t = r_t + gamma V_{t+1} - V_t;   A_t = delta_t + gamma lam A_{t+1}   (padding is skipped)
    returns_t = A_t + V_t;  A is then whitened over valid tokens (verl does) unless whiten=False,
    over the whole batch across `dp_group` when the batch is split over data-parallel ranks.
    """
    _check(token_level_rewards, mask)
    if values is None:
        raise ValueError("GAE needs the critic's values [B, T] (values=...)")
    advantages, returns = K.gae_advantages(token_level_rewards, values, mask, gamma, lam, impl=impl)
    if whiten:
        advantages = K.masked_whiten(advantages, mask, group=dp_group)
    return advantages * mask, returns * mask


def grpo(
    token_level_rewards, mask, *, group_index=None, group_size=None, norm_by_std=True, eps=1e-6, impl="auto", **unused
):
    """GRPO: A_b = (s_b - mean_g(s)) / (std_g(s) + eps) over the group g of b (std unbiased), on every token.

    norm_by_std=False gives the Dr. GRPO variant A_b = s_b - mean_g(s). returns = advantages.
    A group whose scores are all equal gets exactly 0 for any eps >= 0 (verl's loop leaves rounding noise
    / (std + eps) there, up to ~0.18 with eps 1e-6).
    """
    _check(token_level_rewards, mask)
    scores = _scores(token_level_rewards, mask)
    adv = K.grpo_advantages(
        scores, group_index=group_index, group_size=group_size, norm_by_std=norm_by_std, eps=eps, impl=impl
    )
    adv = _broadcast(adv, mask)
    return adv, adv


def rloo(token_level_rewards, mask, *, group_index=None, group_size=None, impl="auto", **unused):
    """RLOO: A_b = s_b - mean of the other n-1 scores of its group = n/(n-1) (s_b - mean_g(s)). returns = advantages."""
    _check(token_level_rewards, mask)
    scores = _scores(token_level_rewards, mask)
    adv = K.rloo_advantages(scores, group_index=group_index, group_size=group_size, impl=impl)
    adv = _broadcast(adv, mask)
    return adv, adv


def reinforce_plus_plus(token_level_rewards, mask, *, gamma=1.0, dp_group=None, impl="auto", **unused):
    """REINFORCE++: returns G_t = r_t + gamma G_{t+1} (reset at padding); A = whiten(G) over valid tokens."""
    _check(token_level_rewards, mask)
    returns = K.reinforce_pp_returns(token_level_rewards, mask, gamma, whiten=False, impl=impl)
    advantages = K.masked_whiten(returns, mask, group=dp_group) * mask
    return advantages, returns * mask


def reinforce_plus_plus_baseline(token_level_rewards, mask, *, group_index=None, group_size=None, dp_group=None,
                                 impl="auto", **unused):
    """REINFORCE++-baseline: A = whiten over valid tokens of (s_b - mean_g(s)) broadcast on tokens. returns = advantages."""
    _check(token_level_rewards, mask)
    adv = K.reinforce_pp_baseline_advantages(
        _scores(token_level_rewards, mask), group_index=group_index, group_size=group_size, mask=mask, impl=impl,
        whiten_group=dp_group,
    )
    adv = adv * mask
    return adv, adv


AdvantageEstimator = Callable[..., tuple[torch.Tensor, torch.Tensor]]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "gae": gae,
    "grpo": grpo,
    "rloo": rloo,
    "reinforce_plus_plus": reinforce_plus_plus,
    "reinforce_plus_plus_baseline": reinforce_plus_plus_baseline,
}


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The estimator registered under `name`; ValueError listing the valid names otherwise."""
    try:
        return ADVANTAGE_ESTIMATORS[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {sorted(ADVANTAGE_ESTIMATORS)}") from None
