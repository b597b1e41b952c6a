"""Triton kernels for the advantage estimators (see `advantage.py` for the formulas and references).

- `_gae_kernel`: GAE as two reverse *linear recurrences* x_t = a_t + b_t x_{t+1}, evaluated with
  `tl.associative_scan(reverse=True)` over [BLOCK_B, BLOCK_T] tiles (coalesced along time) and a
  per-row carry between tiles, instead of T dependent steps:
      E_t = m_{t+1} v_{t+1} + (1 - m_{t+1}) E_{t+1}        next valid value (0 past the last one)
      d_t = r_t + gamma E_t - v_t                            TD error
      L_t = m_t (d_t + gamma lam L_{t+1}) + (1 - m_t) L_{t+1}
      advantages = L m,  returns = advantages + v
- `_returns_kernel`: REINFORCE++ discounted returns R_t = r_t + gamma m_{t+1} R_{t+1} (same scan).
- `_group_kernel`: per-group statistics of equal-size contiguous groups ([G, S] rows), one pass:
  GRPO (r - mean) / (std + eps) or r - mean, RLOO (S r - sum) / (S - 1), plain centring; taken of
  r - (the group's first score), so a group of equal scores gets exactly 0.

Loop trip counts are compile-time constants (`NUM_CHUNKS`): the Triton interpreter used by the CPU
tests cannot loop over runtime bounds, and response lengths are padded to a fixed size anyway. The sizes
B, T and G change from step to step and are not specialised on (Triton would compile a binary per residue
mod 16 met: see `dispatch.size_stable_jit`); the tile sizes take a power of two per length bucket.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# _group_kernel modes (the same codes as advantage._GRPO etc.)
GRPO, GRPO_NO_STD, RLOO, CENTER = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)


@triton.jit
def _affine_combine(a_later, b_later, a_now, b_now):
    # Compose x_t = a_now + b_now * x_{t+1} with x_{t+1} = a_later + b_later * x_{...}.
    return a_now + b_now * a_later, b_now * b_later


@triton.jit
def _scan_with_carry(a, b, carry, is_first):
    """Solve x_t = a_t + b_t x_{t+1} over a tile (reverse in time) given x after the tile = carry."""
    a_cum, b_cum = tl.associative_scan((a, b), 1, _affine_combine, reverse=True)
    x = a_cum + b_cum * carry[:, None]
    return x, tl.sum(tl.where(is_first, x, 0.0), axis=1)


@triton.jit(do_not_specialize=["B", "T"])
def _gae_kernel(r_ptr, v_ptr, m_ptr, adv_ptr, ret_ptr, B, T, gamma, lam,
                NUM_CHUNKS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_T)
    row_in = rows < B
    is_first = (cols == 0)[None, :]
    next_value = tl.zeros((BLOCK_B,), tl.float32)
    last_gae = tl.zeros((BLOCK_B,), tl.float32)
    for i in range(NUM_CHUNKS):
        t = (NUM_CHUNKS - 1 - i) * BLOCK_T + cols
        offs = rows[:, None].to(tl.int64) * T + t[None, :]
        here = row_in[:, None] & (t < T)[None, :]
        after = row_in[:, None] & (t + 1 < T)[None, :]
        r = tl.load(r_ptr + offs, mask=here, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offs, mask=here, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=here, other=0.0).to(tl.float32)
        v1 = tl.load(v_ptr + offs + 1, mask=after, other=0.0).to(tl.float32)
        m1 = tl.load(m_ptr + offs + 1, mask=after, other=0.0).to(tl.float32)
        nxt, next_value = _scan_with_carry(m1 * v1, 1.0 - m1, next_value, is_first)
        delta = r + gamma * nxt - v
        gae, last_gae = _scan_with_carry(m * delta, m * (gamma * lam) + (1.0 - m), last_gae, is_first)
        adv = gae * m
        tl.store(adv_ptr + offs, adv, mask=here)
        tl.store(ret_ptr + offs, adv + v, mask=here)


@triton.jit(do_not_specialize=["B", "T"])
def _returns_kernel(r_ptr, m_ptr, out_ptr, B, T, gamma,
                    NUM_CHUNKS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_T)
    row_in = rows < B
    is_first = (cols == 0)[None, :]
    running = tl.zeros((BLOCK_B,), tl.float32)
    for i in range(NUM_CHUNKS):
        t = (NUM_CHUNKS - 1 - i) * BLOCK_T + cols
        offs = rows[:, None].to(tl.int64) * T + t[None, :]
        here = row_in[:, None] & (t < T)[None, :]
        after = row_in[:, None] & (t + 1 < T)[None, :]
        r = tl.load(r_ptr + offs, mask=here, other=0.0).to(tl.float32)
        m1 = tl.load(m_ptr + offs + 1, mask=after, other=0.0).to(tl.float32)
        ret, running = _scan_with_carry(r, gamma * m1, running, is_first)
        tl.store(out_ptr + offs, ret, mask=here)


@triton.jit(do_not_specialize=["G"])
def _group_kernel(x_ptr, out_ptr, G, eps, S: tl.constexpr, S_POW2: tl.constexpr, BLOCK_G: tl.constexpr,
                  MODE: tl.constexpr):
    groups = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    cols = tl.arange(0, S_POW2)
    here = (groups < G)[:, None] & (cols < S)[None, :]
    offs = groups[:, None] * S + cols[None, :]
    x = tl.load(x_ptr + offs, mask=here, other=0.0).to(tl.float32)
    # statistics of c = x - (the group's first score): exactly 0 on a group of equal scores, so its
    # advantages are exactly 0 (a mean computed as sum / S can differ from x by rounding)
    first = tl.sum(tl.where((cols == 0)[None, :], x, 0.0), axis=1)
    c = tl.where(here, x - first[:, None], 0.0)
    total = tl.sum(c, axis=1)
    if S == 1:  # verl: a lone sample has mean 0 and std 1; RLOO gives it 0
        if MODE == RLOO:
            out = x * 0.0
        elif MODE == GRPO:
            out = x / (1.0 + eps)
        else:
            out = x
    elif MODE == RLOO:
        out = (c * S - total[:, None]) / (S - 1)
    else:
        centred = tl.where(here, c - (total / S)[:, None], 0.0)
        if MODE == GRPO:
            std = tl.sqrt(tl.sum(centred * centred, axis=1) / (S - 1))[:, None]
            # std 0: every centred score is 0 (divided by 1, not 0 + eps, which may be 0: no 0 / 0 computed)
            out = centred / tl.where(std > 0.0, std + eps, 1.0)
        else:  # GRPO_NO_STD, CENTER
            out = centred
    tl.store(out_ptr + offs, out, mask=here)


def _time_blocks(T: int, block_t: int | None):
    """(rows per program, time steps per tile, tiles, warps). Few rows -> few programs: long tiles and
    8 warps keep more loads in flight (the sequential carry between tiles is latency)."""
    block_t = block_t or min(2048, triton.next_power_of_2(max(T, 16)))
    return 1, block_t, triton.cdiv(T, block_t), (8 if block_t >= 1024 else 4)


def gae(rewards, values, mask, gamma: float, lam: float, block_t: int | None = None):
    """Triton GAE on contiguous [B, T] tensors (mask float); returns fp32 (advantages, returns).

    block_t: time steps per tile (a power of two >= 16; default min(2048, next_pow2(T)))."""
    B, T = rewards.shape
    adv = torch.empty(B, T, device=rewards.device, dtype=torch.float32)
    ret = torch.empty_like(adv)
    block_b, block_t, chunks, warps = _time_blocks(T, block_t)
    _gae_kernel[(triton.cdiv(B, block_b),)](rewards, values, mask, adv, ret, B, T, float(gamma), float(lam),
                                            NUM_CHUNKS=chunks, BLOCK_B=block_b, BLOCK_T=block_t, num_warps=warps)
    return adv, ret


def discounted_returns(rewards, mask, gamma: float, block_t: int | None = None):
    """Triton REINFORCE++ returns R_t = r_t + gamma m_{t+1} R_{t+1} on contiguous [B, T] tensors."""
    B, T = rewards.shape
    out = torch.empty(B, T, device=rewards.device, dtype=torch.float32)
    block_b, block_t, chunks, warps = _time_blocks(T, block_t)
    _returns_kernel[(triton.cdiv(B, block_b),)](rewards, mask, out, B, T, float(gamma),
                                                NUM_CHUNKS=chunks, BLOCK_B=block_b, BLOCK_T=block_t, num_warps=warps)
    return out


def group_normalise(x, group_size: int, mode: int, eps: float = 0.0):
    """Triton per-group transform of contiguous equal-size groups: x [G * S] -> fp32 [G * S]."""
    G = x.numel() // group_size
    out = torch.empty(x.numel(), device=x.device, dtype=torch.float32)
    s_pow2 = triton.next_power_of_2(group_size)
    block_g = max(1, min(64, 2048 // s_pow2))
    _group_kernel[(triton.cdiv(G, block_g),)](x, out, G, float(eps), S=group_size, S_POW2=s_pow2,
                                              BLOCK_G=block_g, MODE=mode)
    return out
