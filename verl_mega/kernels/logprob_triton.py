"""Triton kernels for the fused vocab-parallel log-prob + entropy (see `logprob.py`).

GEMM tiles of logits z = hidden @ weight.T / T (bf16/fp16 `tl.dot` on TMA-loaded tiles, fp32
accumulation) with fused epilogues:

- forward (`_fwd_epilogue`): per [BLOCK_M rows, BLOCK_N vocab] tile, only softmax statistics are
  written: max m, s = sum e^(z-m), u = sum e^(z-m)(z-m). No logits reach memory. The columns up to
  a multiple of 256 run without a column mask; the last few (if any) take a second, masked launch.
  `_rows_kernel` merges the tiles of each row and computes the label's logit as one fp32 dot
  product per row (cheaper than looking for the label in every tile).
- backward (`_bwd_epilogue`): the gradient w.r.t. the raw logits of one vocab chunk,
      g = onehot * g_lp / T - p * (c + d * acc),  c = (g_lp - g_ent E[z]) / T,  d = g_ent / T^2,
  (= (g_lp (onehot - p) - g_ent p (z - E[z])) / T), stored in the input dtype by TMA; the two
  gradient GEMMs (g @ W, g.T @ hidden) are left to cuBLAS. The tile leaves out the one-hot term
  (a compare and a select per logit cost 12% of the kernel); `_label_grad_kernel` then writes the
  label column of each row from per-row values (N elements per chunk).
- kept logits (`KeptLogits`): with gradients, the forward's launch over the first backward chunk's
  columns also stores d2 = (z - m_t) * log2(e) (m_t: the row's maximum over its tile) in fp16, and
  `_kept_grad_kernel` later turns it into that chunk's gradient in place (read 2 + write 2 bytes a
  logit instead of a GEMM). fp16 holds d2 to 2^-11 relative, so p = 2^(d2 + m_t - lse) is off by
  at most ~2e-4 of the tile's largest p: below the bf16 rounding of the gradient itself (4e-3).
Both epilogues work in base 2 (exp2 of pre-scaled logits) to keep them to a few instructions per
logit: they are not overlapped with the tensor-core main loop within a tile. The backward stores
wide tiles in two column halves (`SPLIT`), which keeps 128 x 256 tiles free of register spills.

On GPU the kernels are persistent (one program per SM looping over tiles with
`tl.range(flatten=True)`, so the next tile's loads overlap this tile's epilogue), with fixed tile
configurations (`gpu_config`) chosen by `benchmarks/logprob_sweep.py`.
Under `TRITON_INTERPRET=1` (CPU tests) the same kernels run one tile per program (PERSISTENT=False)
with small fixed tiles and dot operands upcast to fp32 (the interpreter's bf16 `tl.dot` is not
usable, and it cannot loop over runtime bounds).

Padding columns and out-of-range rows are masked with a large negative *finite* sentinel rather
than -inf, so that statistics combine without inf - inf = NaN guards.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from verl_mega.kernels.dispatch import interpret_mode, size_stable_jit

# The row count N, a launch's column count V, the tile count T and a chunk's label offset change with
# every micro-batch, and so does the alignment of the per-row vectors (rows of [k, N] buffers):
# specialised, they made a new binary whenever a micro-batch first met another residue mod 16
# (H100, results/h100_2026-12-07g). The large operands (TMA descriptors, the kept logits' and gradient
# buffers, whose rows are padded to 16 elements) keep their alignment hints.
_size_stable_jit = size_stable_jit(
    sizes=("N", "V", "T", "lab_offset"),
    unaligned=("m_ptr", "s_ptr", "u_ptr", "lab_ptr", "init_ptr", "out_ptr", "zt_ptr", "lse_ptr", "ez_ptr", "glp_ptr",
               "gent_ptr", "tmax_ptr"))


NEG = tl.constexpr(-1.0e30)  # "minus infinity" for masked logits: finite, so NEG - NEG = 0, not NaN
LN2 = tl.constexpr(math.log(2.0))
LOG2E = math.log2(math.e)


@triton.jit
def _tile_pid(tile, N, V, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order (as in Triton's matmul tutorial) for L2 reuse: tile -> (pid_m, pid_n)."""
    num_m = tl.cdiv(N, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(V, BLOCK_N)
    first_m = (tile // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_size, (tile % per_group) // group_size


@triton.jit
def _logits_tile(a_desc, b_desc, pid_m, pid_n, H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 tile hidden[rows] @ weight[cols].T via TMA loads (out-of-range rows, cols, k read as 0)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, H, BLOCK_K):
        a = a_desc.load([pid_m * BLOCK_M, k])
        b = b_desc.load([pid_n * BLOCK_N, k])
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc)
    return acc


@triton.jit
def _store_tile(desc, tile, row0, col0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    """Store the fp32 tile [BLOCK_M, BLOCK_N] at (row0, col0) by TMA in desc's dtype, in SPLIT (1 or 2)
    column parts (desc's block is [BLOCK_M, BLOCK_N // SPLIT]: half the shared-memory staging)."""
    if SPLIT == 1:
        desc.store([row0, col0], tile.to(desc.dtype))
    else:
        HALF: tl.constexpr = BLOCK_N // 2
        t0, t1 = tl.split(tl.permute(tl.reshape(tile, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        desc.store([row0, col0], t0.to(desc.dtype))
        desc.store([row0, col0 + HALF], t1.to(desc.dtype))


@triton.jit
def _fwd_epilogue(acc, pid_m, pid_n, m_ptr, s_ptr, u_ptr, d_desc, N, V, scale2, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASK: tl.constexpr, STORE: tl.constexpr, SPLIT: tl.constexpr):
    """Tile statistics (m, s, u) of z = acc / T; scale2 = log2(e) / T. Every tile has a column < V.

    MASK: some columns of the tile may lie beyond V (only the last column block needs it).
    The max is taken on the raw accumulator (scale2 > 0), so that z * log2(e) - max is one FMA.
    STORE: also keep the tile for the backward, d2 = (z - m) * log2(e) <= 0 in d_desc's dtype
    (clamped at -30000, which fp16 holds: 2^-30000 is 0 in fp32 too), by TMA in SPLIT column parts.
    """
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if MASK:
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.where((rn < V)[None, :], acc, NEG / tl.maximum(scale2, 1.0))  # stays finite once scaled
    m2 = tl.max(acc, axis=1) * scale2
    d2 = acc * scale2 - m2[:, None]  # (z - m) * log2(e); ~ -1e30 on masked columns
    e = tl.exp2(d2)  # exactly 0 on masked columns
    s = tl.sum(e, axis=1)
    u2 = tl.sum(e * d2, axis=1)
    if STORE:
        _store_tile(d_desc, tl.maximum(d2, -30000.0), pid_m * BLOCK_M, pid_n * BLOCK_N, BLOCK_M, BLOCK_N, SPLIT)
    row_in = rm < N
    out = pid_n * N + rm
    tl.store(m_ptr + out, m2 * LN2, mask=row_in)
    tl.store(s_ptr + out, s, mask=row_in)
    tl.store(u_ptr + out, u2 * LN2, mask=row_in)


@triton.jit
def _row_coefs(rows, row_in, lse_ptr, ez_ptr, glp_ptr, gent_ptr, inv_temp, HAS_ENT: tl.constexpr):
    """Per-row values of the gradient formula (see `_bwd_epilogue`), fp32 [rows]: lse2 = lse * log2(e),
    glp = g_lp / T, and the coefficients negated, nc = -c, nd = -d (0 on rows outside row_in)."""
    lse2 = tl.load(lse_ptr + rows, mask=row_in, other=0.0) * 1.4426950408889634
    glp = tl.load(glp_ptr + rows, mask=row_in, other=0.0) * inv_temp
    if HAS_ENT:
        gent = tl.load(gent_ptr + rows, mask=row_in, other=0.0) * inv_temp
        nc = gent * tl.load(ez_ptr + rows, mask=row_in, other=0.0) - glp
        nd = -gent * inv_temp
    else:
        nc = -glp
        nd = nc
    return lse2, glp, nc, nd


@triton.jit
def _grad_part(acc, lse2, nc, nd, scale2, HAS_ENT: tl.constexpr):
    """g = p * (nc + nd * acc) = -p * (c + d * acc), p = 2^(acc * scale2 - lse2) (fp32), for a tile or
    part of one (lse2, nc, nd broadcast against acc: [rows, 1] for a tile). The coefficients come
    negated: `-p` would cost a subtraction per logit (Triton lowers it to 0 - p)."""
    p = tl.exp2(acc * scale2 - lse2)
    if HAS_ENT:
        return p * (nc + nd * acc)
    return p * nc


@triton.jit
def _bwd_epilogue(acc, pid_m, pid_n, g_desc, lse_ptr, ez_ptr, glp_ptr, gent_ptr, N, inv_temp,
                  HAS_ENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    """dL/d(raw logits) of the tile without the label term, stored by TMA (rows >= N and columns >= V
    are dropped). The label term (g_lp / T at each row's label column) is written afterwards by
    `_label_grad_kernel`: in the tile it cost a compare and a select per logit, 12% of the kernel.
    SPLIT=2 computes and stores the tile in two column halves: half the registers live at once and
    half the shared-memory staging buffer (no spills at 128 x 256 with 8 warps).
    """
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    lse2, _, nc, nd = _row_coefs(rm, rm < N, lse_ptr, ez_ptr, glp_ptr, gent_ptr, inv_temp, HAS_ENT)
    lse2, nc, nd = lse2[:, None], nc[:, None], nd[:, None]
    scale2 = inv_temp * 1.4426950408889634
    col0 = pid_n * BLOCK_N
    if SPLIT == 1:
        g = _grad_part(acc, lse2, nc, nd, scale2, HAS_ENT)
        g_desc.store([pid_m * BLOCK_M, col0], g.to(g_desc.dtype))
    else:
        HALF: tl.constexpr = BLOCK_N // 2
        a0, a1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        g_desc.store([pid_m * BLOCK_M, col0], _grad_part(a0, lse2, nc, nd, scale2, HAS_ENT).to(g_desc.dtype))
        g_desc.store([pid_m * BLOCK_M, col0 + HALF], _grad_part(a1, lse2, nc, nd, scale2, HAS_ENT).to(g_desc.dtype))


@_size_stable_jit
def _label_grad_kernel(g_ptr, ld_g, lab_ptr, lab_offset, zt_ptr, lse_ptr, ez_ptr, glp_ptr, gent_ptr, N, V, inv_temp,
                       HAS_ENT: tl.constexpr, BLOCK: tl.constexpr):
    """The label column of each row of a gradient chunk g [N, V] (row stride ld_g), written in place.

    Row i's label column l_i = label_i - lab_offset (rows with l_i outside [0, V) are left alone) gets
    the full gradient g_lp/T - p (c + d acc) computed from per-row fp32 values: acc = z_{i, l_i} * T
    (the forward's label logit), as in `_bwd_epilogue`. One element per row: no two programs touch
    the same element.
    """
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_in = rows < N
    lab = tl.load(lab_ptr + rows, mask=row_in, other=-1) - lab_offset
    here = row_in & (lab >= 0) & (lab < V)
    lse2, glp, nc, nd = _row_coefs(rows, here, lse_ptr, ez_ptr, glp_ptr, gent_ptr, inv_temp, HAS_ENT)
    acc = tl.load(zt_ptr + rows, mask=here, other=0.0) * (1.0 / inv_temp)
    g = glp + _grad_part(acc, lse2, nc, nd, inv_temp * 1.4426950408889634, HAS_ENT)
    lab = tl.where(here, lab, 0)
    tl.store(g_ptr + rows.to(tl.int64) * ld_g + lab, g.to(g_ptr.dtype.element_ty), mask=here)


@_size_stable_jit
def _kept_grad_kernel(d_ptr, g_ptr, ld, tmax_ptr, lab_ptr, lab_offset, lse_ptr, ez_ptr, glp_ptr, gent_ptr, N, V,
                      inv_temp, HAS_ENT: tl.constexpr, FWD_BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """The gradient of a chunk whose logits the forward kept: g = dL/d(raw logits) [N, V], label term
    included, written over the kept values d2 [N, V] (same row stride `ld`, same element size).

    d2 = (z - m_t) * log2(e) with m_t the row's maximum over its forward tile (FWD_BLOCK_N columns;
    tmax [tiles, N] fp32, natural units), so z * log2(e) = d2 + m_t * log2(e) and p = 2^(that - lse2).
    BLOCK_C divides FWD_BLOCK_N: a block's columns share one forward tile. Each program reads its
    block before writing it, and no two programs share an element: in place is safe.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    col0 = tl.program_id(1) * BLOCK_C
    cols = col0 + tl.arange(0, BLOCK_C)
    row_in = rows < N
    msk = row_in[:, None] & (cols < V)[None, :]
    off = rows[:, None].to(tl.int64) * ld + cols[None, :]
    d2 = tl.load(d_ptr + off, mask=msk, other=0.0).to(tl.float32)
    m2 = tl.load(tmax_ptr + (col0 // FWD_BLOCK_N) * N + rows, mask=row_in, other=0.0) * 1.4426950408889634
    lse2, glp, nc, nd = _row_coefs(rows, row_in, lse_ptr, ez_ptr, glp_ptr, gent_ptr, inv_temp, HAS_ENT)
    scale2 = inv_temp * 1.4426950408889634
    acc = (d2 + m2[:, None]) * (1.0 / scale2)  # the raw logit: d2 + m2 = z * log2(e) = acc * scale2
    g = _grad_part(acc, lse2[:, None], nc[:, None], nd[:, None], scale2, HAS_ENT)
    lab = tl.load(lab_ptr + rows, mask=row_in, other=-1) - lab_offset
    g = tl.where(cols[None, :] == lab[:, None], g + glp[:, None], g)
    tl.store(g_ptr + off, g.to(g_ptr.dtype.element_ty), mask=msk)


@triton.jit
def _fwd_tile(a_desc, b_desc, d_desc, tile, m_ptr, s_ptr, u_ptr, N, V, H: tl.constexpr, scale2,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
              UPCAST: tl.constexpr, MASK: tl.constexpr, STORE: tl.constexpr, SPLIT: tl.constexpr):
    pid_m, pid_n = _tile_pid(tile, N, V, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _logits_tile(a_desc, b_desc, pid_m, pid_n, H, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
    _fwd_epilogue(acc, pid_m, pid_n, m_ptr, s_ptr, u_ptr, d_desc, N, V, scale2, BLOCK_M, BLOCK_N, MASK, STORE, SPLIT)


@_size_stable_jit
def _fwd_kernel(a_desc, b_desc, d_desc, m_ptr, s_ptr, u_ptr, N, V, H: tl.constexpr, scale2, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PERSISTENT: tl.constexpr,
                UPCAST: tl.constexpr, MASK: tl.constexpr, STORE: tl.constexpr, SPLIT: tl.constexpr):
    """Forward statistics; PERSISTENT: a grid of one program per SM looping over tiles.
    MASK=False: V is a multiple of BLOCK_N (no column test per logit). STORE: keep the tiles (d_desc)."""
    if PERSISTENT:
        num_tiles = tl.cdiv(N, BLOCK_M) * tl.cdiv(V, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
            _fwd_tile(a_desc, b_desc, d_desc, tile, m_ptr, s_ptr, u_ptr, N, V, H, scale2, BLOCK_M, BLOCK_N, BLOCK_K,
                      GROUP_M, UPCAST, MASK, STORE, SPLIT)
    else:  # one tile per program (the interpreter cannot loop over run-time bounds)
        _fwd_tile(a_desc, b_desc, d_desc, tl.program_id(0), m_ptr, s_ptr, u_ptr, N, V, H, scale2, BLOCK_M, BLOCK_N,
                  BLOCK_K, GROUP_M, UPCAST, MASK, STORE, SPLIT)


@triton.jit
def _bwd_tile(a_desc, b_desc, g_desc, tile, lse_ptr, ez_ptr, glp_ptr, gent_ptr, N, V, H: tl.constexpr, inv_temp,
              HAS_ENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              GROUP_M: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    pid_m, pid_n = _tile_pid(tile, N, V, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _logits_tile(a_desc, b_desc, pid_m, pid_n, H, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
    _bwd_epilogue(acc, pid_m, pid_n, g_desc, lse_ptr, ez_ptr, glp_ptr, gent_ptr, N, inv_temp, HAS_ENT, BLOCK_M,
                  BLOCK_N, SPLIT)


@_size_stable_jit
def _bwd_kernel(a_desc, b_desc, g_desc, lse_ptr, ez_ptr, glp_ptr, gent_ptr, N, V, H: tl.constexpr, inv_temp,
                HAS_ENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr, SPLIT: tl.constexpr, PERSISTENT: tl.constexpr, UPCAST: tl.constexpr):
    """Gradient of one vocab chunk's logits without the label term (`_label_grad_kernel` adds it);
    PERSISTENT as in `_fwd_kernel`."""
    if PERSISTENT:
        num_tiles = tl.cdiv(N, BLOCK_M) * tl.cdiv(V, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
            _bwd_tile(a_desc, b_desc, g_desc, tile, lse_ptr, ez_ptr, glp_ptr, gent_ptr, N, V, H, inv_temp, HAS_ENT,
                      BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT, UPCAST)
    else:
        _bwd_tile(a_desc, b_desc, g_desc, tl.program_id(0), lse_ptr, ez_ptr, glp_ptr, gent_ptr, N, V, H, inv_temp,
                  HAS_ENT, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT, UPCAST)


@_size_stable_jit
def _rows_kernel(m_ptr, s_ptr, u_ptr, h_ptr, w_ptr, lab_ptr, lab_offset, init_ptr, out_ptr, N, V, H: tl.constexpr,
                 stride_h, stride_w, inv_temp, T, BLOCK: tl.constexpr, T_BLOCK: tl.constexpr,
                 BLOCK_H: tl.constexpr, INIT: tl.constexpr):
    """Per row: merge the T per-tile (m, s, u) statistics, and compute the label's logit.

    T is a runtime argument, not a constexpr: the tile count follows the kept chunk's width, which
    follows the row count, so a constexpr T compiled the kernel again for most packed micro-batches
    (about 90 ms each on an H100, 2.2 s of one 1.5B update step).

    out [4, N] fp32 = (m, s, u, zt). Statistics: online-softmax rescaling, T_BLOCK tiles at a time
    (a [T_BLOCK, BLOCK] block per statistic), so the serial loop is T / T_BLOCK steps long.
    zt_i = hidden[i] . weight[l_i] * inv_temp in fp32 with l_i = label_i - lab_offset where l_i is
    in [0, V), else 0 (cheaper than looking for the label in every tile of the GEMM).
    INIT: start from the (m, s, u, zt) [4, N] of other columns at init_ptr (zt adds: a label lies in
    at most one of the two column ranges).
    """
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_in = rows < N
    if INIT:
        M = tl.load(init_ptr + rows, mask=row_in, other=NEG)
        S = tl.load(init_ptr + N + rows, mask=row_in, other=0.0)
        U = tl.load(init_ptr + 2 * N + rows, mask=row_in, other=0.0)
    else:
        M = tl.full((BLOCK,), NEG, tl.float32)
        S = tl.zeros((BLOCK,), tl.float32)
        U = tl.zeros((BLOCK,), tl.float32)
    t0 = 0
    while t0 < T:  # not range(0, T, ...): the interpreter (numpy 2) cannot index a runtime int
        ts = t0 + tl.arange(0, T_BLOCK)
        msk = (ts < T)[:, None] & row_in[None, :]
        off = ts[:, None] * N + rows[None, :]
        mt = tl.load(m_ptr + off, mask=msk, other=NEG)
        st = tl.load(s_ptr + off, mask=msk, other=0.0)
        ut = tl.load(u_ptr + off, mask=msk, other=0.0)
        Mn = tl.maximum(M, tl.max(mt, axis=0))
        a = tl.exp(M - Mn)
        dt = mt - Mn[None, :]
        b = tl.exp(dt)
        U = a * (U + (M - Mn) * S) + tl.sum(b * (ut + dt * st), axis=0)
        S = a * S + tl.sum(b * st, axis=0)
        M = Mn
        t0 += T_BLOCK
    lab = tl.load(lab_ptr + rows, mask=row_in, other=-1) - lab_offset
    here = row_in & (lab >= 0) & (lab < V)
    cols = tl.arange(0, BLOCK_H)
    zt = tl.zeros((BLOCK,), tl.float32)
    for k in range(0, H, BLOCK_H):
        msk = here[:, None] & ((k + cols) < H)[None, :]
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + k + cols[None, :], mask=msk, other=0.0)
        w = tl.load(w_ptr + lab[:, None].to(tl.int64) * stride_w + k + cols[None, :], mask=msk, other=0.0)
        zt += tl.sum(h.to(tl.float32) * w.to(tl.float32), axis=1)
    tl.store(out_ptr + rows, M, mask=row_in)
    tl.store(out_ptr + N + rows, S, mask=row_in)
    tl.store(out_ptr + 2 * N + rows, U, mask=row_in)
    zt = zt * inv_temp
    if INIT:
        zt += tl.load(init_ptr + 3 * N + rows, mask=row_in, other=0.0)
    tl.store(out_ptr + 3 * N + rows, zt, mask=row_in)


# ----------------------------------------------------------------------------- launching
# GPU tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), one program per SM. Chosen by a sweep on H200
# (benchmarks/logprob_sweep.py; notes in benchmarks/results/kernels.md): 128 x 256 tiles with 8 warps
# and 3 stages were fastest in both directions at H = 896 and 4096. Autotuning between them and
# 256 x 128 (earlier sessions) never found the latter more than 1% faster and cost a search, with
# compiles, at every new token-count bucket in the middle of training: fixed configurations instead.
# Slower there: two programs per SM (128 x 128, 4 warps, one program's epilogue overlapping the
# other's main loop), 64-row tiles, BLOCK_K = 128, Triton's Hopper warp specialisation. 4 stages
# matched 3 over a whole backward (A/B: `benchmarks/logprob_sweep.py --stages`) with 229 KB of shared
# memory per program.
_LARGE = (128, 256, 64, 8, 3)
_SMALL = (128, 128, 64, 8, 4)  # up to SMALL_MAX_ROWS tokens (tests, short micro-batches): fewer idle tiles
SMALL_MAX_ROWS = 1024
UNMASKED_MIN_ROWS = 4096  # forward: from this many rows on, the columns before the last partial tile run unmasked
_WIDEST_BLOCK_N = _LARGE[1]
assert _WIDEST_BLOCK_N % _SMALL[1] == 0
INTERP_SPLIT = 2  # backward epilogue halves under the interpreter (tests also run 1)
_INTERP_TILE = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2}  # interpreter


def warm_token_counts() -> tuple[int, ...]:
    """A token count in each regime of the launch choices (`gpu_config`'s tiles, `_stats`' masked launches): small
    tiles with one masked launch, large tiles with one masked launch, large tiles with an unmasked launch and a
    masked one (see `logprob.warm_up_logprob_kernels`)."""
    return SMALL_MAX_ROWS, (SMALL_MAX_ROWS + UNMASKED_MIN_ROWS) // 2, UNMASKED_MIN_ROWS


def gpu_config(n_rows: int, forward: bool) -> tuple[dict, dict]:
    """(kernel meta-parameters, launch options) of the GPU kernels for `n_rows` tokens.

    Forward: groups of 32 row blocks (4096 rows) per sweep of the vocabulary, so the whole weight is
    streamed from memory N / 4096 times instead of N / 1024 (3-5% faster on H200); the backward's
    chunk of the weight stays in L2 whatever the order. SPLIT: column parts of a stored tile.
    """
    bm, bn, bk, warps, stages = _SMALL if n_rows <= SMALL_MAX_ROWS else _LARGE
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 32 if forward else 8,
            "SPLIT": 2 if bn >= 256 else 1}
    return meta, {"num_warps": warps, "num_stages": stages}


def _config(n_rows: int, forward: bool) -> tuple[dict, dict]:
    """`gpu_config`, or the interpreter's small tiles under TRITON_INTERPRET=1."""
    if interpret_mode():
        return {**_INTERP_TILE, "SPLIT": INTERP_SPLIT}, {}
    return gpu_config(n_rows, forward)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch(forward: bool, N, V, tensors, args, kwargs):
    """Launch over TMA descriptors of `tensors` (hidden, weight[, stored/gradient output]); returns
    the number of column tiles."""
    interp = interpret_mode()
    meta, opts = _config(N, forward)
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    descs = [TensorDescriptor.from_tensor(t, [rows, bk]) for t, rows in zip(tensors[:2], (bm, bn))]
    out = tensors[2] if len(tensors) > 2 else None
    descs.append(None if out is None else TensorDescriptor.from_tensor(out, [bm, bn // meta["SPLIT"]]))
    if forward:
        kwargs = {**kwargs, "STORE": out is not None}
    tiles = triton.cdiv(N, bm) * triton.cdiv(V, bn)
    grid = (tiles if interp else min(tiles, _num_sms(tensors[0].device.index or 0)),)
    kernel = _fwd_kernel if forward else _bwd_kernel
    kernel[grid](*descs, *args, **kwargs, **meta, **opts, PERSISTENT=not interp, UPCAST=interp)
    return triton.cdiv(V, bn)


class ForwardStats(NamedTuple):
    """`forward_stats`' result: fp32 [N] max m, s = sum e^(z-m), u = sum e^(z-m)(z-m), label logit zt,
    and the kept logits of the first `keep` columns (None when none were kept)."""
    m: torch.Tensor
    s: torch.Tensor
    u: torch.Tensor
    zt: torch.Tensor
    kept: "KeptLogits | None"


class KeptLogits(NamedTuple):
    """Logits of the columns [0, cols) kept by the forward for the backward (see `kept_grad_logits`).

    values [N, >= cols]: (z - m_t) * log2(e) in fp16 on GPU (fp32 under the interpreter), m_t the
    row's maximum over its forward tile; tile_max [tiles, N] fp32 (natural units); block_n: the
    forward tile width.
    """
    values: torch.Tensor
    tile_max: torch.Tensor
    cols: int
    block_n: int


def forward_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, label_offset: int,
                  inv_temp: float, keep: int = 0, keep_width: int = 0) -> ForwardStats:
    """Per-row softmax statistics of z = hidden @ weight.T * inv_temp over all rows of `weight`.

    hidden [N, H], weight [V, H] (the shard's valid vocabulary rows; contiguous, 16-byte aligned
    rows, same dtype), labels [N] integer ids whose column here is label - label_offset (anything
    outside [0, V) means "not on this shard"). keep > 0: also keep the logits of the first `keep`
    columns (any count; whole 256-column tiles skip the column mask) in a buffer
    [N, keep_width >= keep], which the backward turns into its first gradient chunk in place
    instead of recomputing the GEMM.
    The other columns run first: their tile statistics are merged and freed before the kept
    buffer is allocated, so the peak is the larger of the two, not the sum.
    """
    N = hidden.shape[0]
    V = weight.shape[0]
    keep = min(keep, V)
    rest = _stats(hidden, weight[keep:], labels, label_offset + keep, inv_temp) if keep < V else None
    if keep == 0:
        return ForwardStats(*rest, None)
    dtype = torch.float16 if hidden.is_cuda and hidden.dtype != torch.float32 else torch.float32
    values = torch.empty(N, max(keep_width, keep), device=hidden.device, dtype=dtype)
    out, tile_max = _stats(hidden, weight[:keep], labels, label_offset, inv_temp, init=rest,
                           store=values[:, :keep])
    return ForwardStats(*out, KeptLogits(values, tile_max, keep, _config(N, True)[0]["BLOCK_N"]))


def _stats(hidden, weight, labels, label_offset: int, inv_temp: float, init=None, store=None):
    """(m, s, u, zt) [4, N] over the columns of `weight`, merged with `init` ([4, N] of other columns).
    With `store` [N, V]: one launch that also keeps the logits there; returns (stats, tile maxima)."""
    N, H = hidden.shape
    V = weight.shape[0]
    bn = _config(N, True)[0]["BLOCK_N"]
    parts = torch.empty(3, triton.cdiv(V, bn) + 1, N, device=hidden.device, dtype=torch.float32)  # [stat, tile, row]
    # The columns up to a multiple of the widest BLOCK_N (a multiple of every BLOCK_N) need no column
    # mask; the few after them (< 256) take a second launch with the mask, its tiles stored after.
    # Small N: one masked launch (a second launch costs more host time than the mask costs the GPU).
    width = _INTERP_TILE["BLOCK_N"] if interpret_mode() else _WIDEST_BLOCK_N
    v_main = V // width * width if N >= UNMASKED_MIN_ROWS else 0
    if store is not None:
        v_main = V if v_main == V else 0  # one launch: unmasked when V is whole tiles
    tiles = 0
    for c0, c1, mask in ((0, v_main, False), (v_main, V, True)):
        if c1 > c0:
            args = (parts[0, tiles:], parts[1, tiles:], parts[2, tiles:], N, c1 - c0, H, inv_temp * LOG2E)
            tensors = (hidden, weight[c0:c1]) + (() if store is None else (store,))
            tiles += _launch(True, N, c1 - c0, tensors, args, {"MASK": mask})
    out = _finish_rows(parts, tiles, hidden, weight, labels, label_offset, inv_temp, init)
    return out if store is None else (out, parts[0, :tiles].clone())


def _finish_rows(parts, tiles: int, hidden, weight, labels, label_offset: int, inv_temp: float, init=None):
    """(m, s, u, zt) fp32 [4, N] from the per-tile statistics parts [3, >= tiles, N] (see `_rows_kernel`),
    merged with `init` [4, N] when given."""
    N, H = hidden.shape
    out = torch.empty(4, N, device=hidden.device, dtype=torch.float32)
    block = 32
    _rows_kernel[(triton.cdiv(N, block),)](parts[0], parts[1], parts[2], hidden, weight, labels, label_offset,
                                           out if init is None else init, out, N, weight.shape[0], H,
                                           hidden.stride(0), weight.stride(0), inv_temp, T=tiles, BLOCK=block,
                                           T_BLOCK=16 if interpret_mode() else 32, BLOCK_H=128,
                                           INIT=init is not None)
    return out


def grad_logits(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                ez: torch.Tensor | None, g_lp: torch.Tensor, g_ent: torch.Tensor | None,
                labels: torch.Tensor, label_logit: torch.Tensor, col_offset: int, inv_temp: float) -> torch.Tensor:
    """Write d(loss)/d(raw logits) for the rows of `weight` (one vocab chunk) into `out` [N, V].

    `out` may be a column slice of a wider buffer (row stride > V, 16-byte aligned). lse, ez, g_lp,
    g_ent and label_logit (z at the label, from the forward) are fp32 [N]; labels [N] integer ids,
    the label's column in this chunk being label - col_offset (outside [0, V): not in this chunk).
    Two launches: the tiles without the label term, then the label column of each row.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    has_ent = g_ent is not None
    ez, g_ent = (ez, g_ent) if has_ent else (lse, g_lp)  # placeholders, unused without entropy
    args = (lse, ez, g_lp, g_ent, N, V, H, inv_temp)
    _launch(False, N, V, (hidden, weight, out), args, {"HAS_ENT": has_ent})
    block = 128
    _label_grad_kernel[(triton.cdiv(N, block),)](out, out.stride(0), labels, col_offset, label_logit, lse, ez, g_lp,
                                                 g_ent, N, V, inv_temp, HAS_ENT=has_ent, BLOCK=block)
    return out


def kept_grad_logits(kept: KeptLogits, out: torch.Tensor, lse: torch.Tensor, ez: torch.Tensor | None,
                     g_lp: torch.Tensor, g_ent: torch.Tensor | None, labels: torch.Tensor, col_offset: int,
                     inv_temp: float) -> torch.Tensor:
    """Write d(loss)/d(raw logits) of the kept columns [0, kept.cols) into `out` [N, kept.cols], a view
    of kept.values' memory (same element size; the kept values are consumed). Arguments as in
    `grad_logits`, label term included. One memory-bound launch instead of a GEMM."""
    N, V = out.shape
    assert out.data_ptr() == kept.values.data_ptr() and out.stride(0) == kept.values.stride(0) and V == kept.cols
    has_ent = g_ent is not None
    ez, g_ent = (ez, g_ent) if has_ent else (lse, g_lp)
    # 8 x 256 blocks, 4 warps: 16 elements a thread in 91 registers (32 x 128 took 227), so that
    # enough programs share an SM to keep the memory busy.
    block_r, block_c = (16, 32) if interpret_mode() else (8, 256)
    block_c = min(block_c, kept.block_n)
    grid = (triton.cdiv(N, block_r), triton.cdiv(V, block_c))
    _kept_grad_kernel[grid](kept.values, out, out.stride(0), kept.tile_max, labels, col_offset, lse, ez, g_lp, g_ent,
                            N, V, inv_temp, HAS_ENT=has_ent, FWD_BLOCK_N=kept.block_n, BLOCK_R=block_r,
                            BLOCK_C=block_c, **({} if interpret_mode() else {"num_warps": 4}))
    return out
