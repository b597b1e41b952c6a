"""Advantage estimators and masked statistics: pure tensor functions, Triton on GPU, torch elsewhere.

Semantics follow verl's `trainer/ppo/core_algos.py` and `utils/torch_functional.py`:
GAE (`compute_gae_advantage_return`, including its skipping of mask-0 tokens), GRPO
(`compute_grpo_outcome_advantage`), RLOO, REINFORCE++ and REINFORCE++-baseline. Deliberate
differences, all documented below: GAE advantages are 0 where mask is 0 and are not whitened here
(call `masked_whiten`); a group of size 1 gets RLOO advantage 0 (verl leaves the raw score).

Every estimator has a plain-torch reference beside it (`reference_*`, Python loops as in verl) that
the tests compare against. Groups are either `group_size` (contiguous groups of equal size: the
fast path, one Triton kernel) or `group_index` (arbitrary ids, any order: a torch scatter path).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist

from verl_mega.kernels.dispatch import resolve_impl


# ----------------------------------------------------------------------------- masked statistics
def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """sum(x * mask) / (sum(mask) + 1e-8) over `dim` (all elements when None); x, mask same shape."""
    x = torch.where(mask.bool(), x, 0.0) * mask
    if dim is None:
        return x.sum() / (mask.sum() + 1e-8)
    return x.sum(dim) / (mask.sum(dim) + 1e-8)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Masked variance over all elements, times n / (n - 1) (Bessel) when `unbiased`, n = sum(mask)."""
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    if unbiased:
        n = float(mask.sum())
        if n == 0:
            raise ValueError("masked_var: the mask selects no element")
        if n == 1:
            raise ValueError("masked_var: the mask selects one element; the unbiased variance is undefined")
        var = var * (n / (n - 1))
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  group=None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) with masked mean and unbiased masked variance (mean kept if not shift_mean).

    With a process `group` of several ranks (the data-parallel group) the statistics are those of
    the union of every rank's masked elements (one all-reduce of [sum, sum of squares, count]), so a
    batch split over data-parallel ranks is whitened exactly as the whole batch in one process.
    """
    if group is not None and dist.get_world_size(group) > 1:
        mean, var = _global_masked_moments(x, mask, group)
    else:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def _global_masked_moments(x: torch.Tensor, mask: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean and unbiased variance over all ranks of `group` (fp64 sums, one all-reduce)."""
    m = mask.to(torch.float64)
    x64 = x.to(torch.float64)
    stats = torch.stack([(x64 * m).sum(), (x64 * x64 * m).sum(), m.sum()])  # [sum, sum of squares, count]
    dist.all_reduce(stats, group=group)
    total, total_sq, n = stats.unbind()
    if float(n) < 2:
        raise ValueError(f"masked_whiten: the mask selects {int(n)} element(s) over the group; need at least 2")
    mean = total / n
    var = (total_sq - n * mean * mean) / (n - 1)
    return mean.to(x.dtype), var.clamp(min=0).to(x.dtype)


# ----------------------------------------------------------------------------- GAE
def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float,
                   *, impl: str = "auto"):
    """Generalised advantage estimation (Schulman et al. 2016) over token rewards, per row.

    rewards, values, mask [B, T] (mask 1 on response tokens). Backwards over t, with E the value of
    the next mask-1 token (0 past the last one) and L_T = 0:
        delta_t = r_t + gamma * E_t - v_t
        L_t = m_t * (delta_t + gamma * lam * L_{t+1}) + (1 - m_t) * L_{t+1}
    Returns fp32 (advantages = L * m, returns = advantages + values), both [B, T]; not whitened.
    """
    _check_same_2d(rewards=rewards, values=values, mask=mask)
    if resolve_impl(impl, rewards) == "triton":
        from verl_mega.kernels import advantage_triton
        return advantage_triton.gae(rewards.contiguous(), values.contiguous(), _float_mask(mask), gamma, lam)
    return reference_gae(rewards, values, mask, gamma, lam)


def reference_gae(rewards, values, mask, gamma: float, lam: float):
    """verl's reverse loop over time, vectorised over the batch (also the CPU fallback)."""
    rewards, values, mask = rewards.float(), values.float(), mask.float()
    next_value = torch.zeros_like(rewards[:, 0])
    last_gae = torch.zeros_like(rewards[:, 0])
    reversed_adv = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        gae = delta + gamma * lam * last_gae
        next_value = values[:, t] * mask[:, t] + (1 - mask[:, t]) * next_value
        last_gae = gae * mask[:, t] + (1 - mask[:, t]) * last_gae
        reversed_adv.append(last_gae)
    advantages = torch.stack(reversed_adv[::-1], dim=1) * mask
    return advantages, advantages + values


# ----------------------------------------------------------------------------- outcome (group) advantages
def grpo_advantages(scores: torch.Tensor, groups=None, *, group_index=None, group_size: int | None = None,
                    norm_by_std: bool = True, eps: float = 1e-6, impl: str = "auto") -> torch.Tensor:
    """GRPO outcome advantage (Shao et al. 2024): (r_i - mean_g) / (std_g + eps), or r_i - mean_g.

    scores [B]; groups: a group-id tensor/array [B] or an int group size (contiguous groups), also
    accepted as `group_index=` / `group_size=`. std is unbiased (torch.std); a group of one sample
    has mean 0 and std 1 (as verl). A group of equal scores gets exactly 0 for any eps >= 0 (verl's
    sum / n mean leaves rounding noise there, divided by std + eps ~ eps). Returns fp32 [B].
    """
    mode = _GRPO if norm_by_std else _GRPO_NO_STD
    return _group_transform(scores, _groups_arg(groups, group_index, group_size), mode, eps, impl)


def rloo_advantages(scores: torch.Tensor, groups=None, *, group_index=None, group_size: int | None = None,
                    impl: str = "auto") -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): r_i - mean of the other samples of its group = (n r_i - sum) / (n - 1).

    A group of one sample gets 0. Returns fp32 [B].
    """
    return _group_transform(scores, _groups_arg(groups, group_index, group_size), _RLOO, 0.0, impl)


def reinforce_pp_baseline_advantages(scores: torch.Tensor, groups=None, mask: torch.Tensor | None = None, *,
                                     group_index=None, group_size: int | None = None,
                                     impl: str = "auto", whiten_group=None) -> torch.Tensor:
    """REINFORCE++-baseline (Hu 2025): subtract the group mean, broadcast over tokens, whiten over the batch.

    scores [B], mask [B, T] -> fp32 [B, T] = masked_whiten((r - mean_g) * mask, mask) * mask
    (a group of one sample keeps its raw score, as verl). `whiten_group`: see `masked_whiten`'s group.
    """
    if mask is None or mask.dim() != 2 or mask.shape[0] != scores.shape[0]:
        raise ValueError(f"mask must be [B={scores.shape[0]}, T], got {None if mask is None else tuple(mask.shape)}")
    centred = _group_transform(scores, _groups_arg(groups, group_index, group_size), _CENTER, 0.0, impl)
    mask = mask.float()
    return masked_whiten(centred[:, None] * mask, mask, group=whiten_group) * mask


def reinforce_pp_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float, *, whiten: bool = True,
                         impl: str = "auto") -> torch.Tensor:
    """REINFORCE++ (Hu 2025) token advantages: discounted returns, then whitening over the batch.

    token_rewards, mask [B, T]. R_t = r_t + gamma * m_{t+1} * R_{t+1} (the running return is reset
    after the last response token, as verl). Returns fp32 [B, T]:
    masked_whiten(R, mask) * mask if `whiten`, else R * mask.
    """
    _check_same_2d(token_rewards=token_rewards, mask=mask)
    if resolve_impl(impl, token_rewards) == "triton":
        from verl_mega.kernels import advantage_triton
        returns = advantage_triton.discounted_returns(token_rewards.contiguous(), _float_mask(mask), gamma)
    else:
        returns = reference_discounted_returns(token_rewards, mask, gamma)
    mask = mask.float()
    return masked_whiten(returns, mask) * mask if whiten else returns * mask


def reference_discounted_returns(token_rewards, mask, gamma: float):
    """verl's REINFORCE++ return loop (reset after EOS), vectorised over the batch."""
    rewards, mask = token_rewards.float(), mask.float()
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
        running = running * mask[:, t]
    return returns


_GRPO, _GRPO_NO_STD, _RLOO, _CENTER = 0, 1, 2, 3  # same codes as advantage_triton


def reference_group_advantages(scores, group_index, mode: int, eps: float = 0.0) -> torch.Tensor:
    """Per-sample Python loop over groups, as verl (reference for all four group transforms)."""
    ids = _group_ids(group_index, len(scores)).tolist()
    members = defaultdict(list)
    for i, g in enumerate(ids):
        members[g].append(i)
    out = torch.zeros(len(scores), dtype=torch.float32)
    x = scores.detach().float().cpu()
    for idx in members.values():
        vals = x[idx]
        n = len(idx)
        mean, std = (vals.mean(), vals.std()) if n > 1 else (torch.tensor(0.0), torch.tensor(1.0))
        if mode == _GRPO:
            out[idx] = (vals - mean) / (std + eps)
        elif mode == _RLOO:
            out[idx] = (vals * n - vals.sum()) / (n - 1) if n > 1 else 0.0
        else:
            out[idx] = vals - mean
    return out.to(scores.device)


def _group_transform(scores, groups, mode: int, eps: float, impl: str) -> torch.Tensor:
    if scores.dim() != 1:
        raise ValueError(f"scores must be [B], got shape {tuple(scores.shape)}")
    if isinstance(groups, int):
        if groups < 1 or scores.numel() % groups:
            raise ValueError(f"group_size={groups} must be positive and divide the batch size {scores.numel()}")
        if resolve_impl(impl, scores) == "triton":
            from verl_mega.kernels import advantage_triton
            return advantage_triton.group_normalise(scores.contiguous(), groups, mode, eps)
        return _torch_equal_groups(scores.float().view(-1, groups), mode, eps).reshape(-1)  # [G, S] -> [B]
    resolve_impl(impl, scores)  # validates impl; arbitrary ids always take the scatter path
    return _torch_scatter_groups(scores.float(), _group_ids(groups, scores.numel()).to(scores.device), mode, eps)


def _torch_equal_groups(x, mode: int, eps: float):
    """x [G, S] contiguous groups; the torch twin of advantage_triton._group_kernel.

    Statistics are taken of c = x - (the group's first score), which is exactly 0 for a group of equal
    scores, so its advantages are exactly 0 (a mean computed as sum / n can differ from x by rounding:
    eight scores of 0.7 would otherwise get GRPO advantages of ~0.06 with eps 1e-6, inf with eps 0)."""
    s = x.shape[1]
    if s == 1:
        return torch.zeros_like(x) if mode == _RLOO else (x / (1.0 + eps) if mode == _GRPO else x.clone())
    c = x - x[:, :1]  # [G, S], exactly 0 on equal groups
    if mode == _RLOO:
        return (c * s - c.sum(dim=1, keepdim=True)) / (s - 1)
    centred = c - c.mean(dim=1, keepdim=True)
    if mode == _GRPO:
        return _scale_by_std(centred, (centred.square().sum(dim=1, keepdim=True) / (s - 1)).sqrt(), eps)
    return centred


def _scale_by_std(centred, std, eps: float):
    """centred / (std + eps), and 0 where std == 0 (every centred score of the group is then 0)."""
    return torch.where(std > 0, centred / (std + eps), torch.zeros((), dtype=centred.dtype, device=centred.device))


def _torch_scatter_groups(x, ids, mode: int, eps: float):
    """x [B] with group ids in [0, G): segment statistics by index_add (any order, any sizes), of
    c = x - (the group's first score) as in `_torch_equal_groups` (equal scores give exactly 0)."""
    g, b = int(ids.max()) + 1, x.numel()
    count = torch.zeros(g, device=x.device).index_add_(0, ids, torch.ones_like(x))
    position = torch.arange(b, device=x.device)
    first = torch.full((g,), b, device=x.device, dtype=torch.long).scatter_reduce_(0, ids, position, "amin")
    c = x - x[first][ids]  # [B]
    total = torch.zeros(g, device=x.device).index_add_(0, ids, c)
    n = count[ids]
    single = n == 1
    if mode == _RLOO:
        return torch.where(single, 0.0, (c * n - total[ids]) / (n - 1).clamp_min(1))
    centred = torch.where(single, x, c - (total / count)[ids])  # a lone sample: mean 0 (verl)
    if mode != _GRPO:
        return centred
    sq = torch.zeros(g, device=x.device).index_add_(0, ids, torch.where(single, 0.0, centred) ** 2)
    std = torch.where(single, 1.0, (sq[ids] / (n - 1).clamp_min(1)).sqrt())
    return _scale_by_std(centred, std, eps)


def _groups_arg(groups, group_index, group_size):
    given = [a for a in (groups, group_index, group_size) if a is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of groups, group_index= (ids [B]) or group_size= (int)")
    return int(given[0]) if isinstance(given[0], (int, np.integer)) else given[0]


def _group_ids(group_index, batch: int) -> torch.Tensor:
    """Any ids (tensor, numpy array of ints/strings, list) -> consecutive int64 ids in [0, G)."""
    if isinstance(group_index, torch.Tensor):
        if group_index.dtype.is_floating_point:
            raise ValueError(f"group_index must hold integer ids, got {group_index.dtype}")
        ids = torch.unique(group_index, return_inverse=True)[1]
    else:
        ids = torch.from_numpy(np.unique(np.asarray(group_index), return_inverse=True)[1].reshape(-1))
    if ids.numel() != batch:
        raise ValueError(f"group_index has {ids.numel()} entries for a batch of {batch}")
    return ids.long().reshape(-1)


def _check_same_2d(**tensors):
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected tensors of one [B, T] shape, got {shapes}")


def _float_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask if mask.dtype == torch.float32 else mask.float()).contiguous()
