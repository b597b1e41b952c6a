"""Triton kernels for the fused vocab-parallel log-prob + entropy (see `logprob.py`).

GEMM tiles of logits z = hidden @ weight.T / T (bf16/fp16 `tl.dot` on TMA-loaded tiles, fp32
accumulation) with fused epilogues:

- forward (`_fwd_epilogue`): per [BLOCK_M rows, BLOCK_N vocab] tile, only softmax statistics are
  written: max m, s = sum e^(z-m), u = sum e^(z-m)(z-m). No logits reach memory.
  `_combine_kernel` merges the tiles of each row; `_target_kernel` computes the label's logit as
  one fp32 dot product per row (cheaper than looking for the label in every tile).
- backward (`_bwd_epilogue`): the gradient w.r.t. the raw logits of one vocab chunk,
      g = onehot * g_lp / T - p * (c + d * acc),  c = (g_lp - g_ent E[z]) / T,  d = g_ent / T^2,
  (= (g_lp (onehot - p) - g_ent p (z - E[z])) / T), stored in the input dtype by TMA; the two
  gradient GEMMs (g @ W, g.T @ hidden) are left to cuBLAS.
Both epilogues work in base 2 (exp2 of pre-scaled logits) to keep them to a few instructions per
logit: they are not overlapped with the tensor-core main loop within a tile. The backward stores
wide tiles in two column halves (`SPLIT`), which keeps 128 x 256 tiles free of register spills.

On GPU the kernels are persistent (a grid of 1-2 programs per SM looping over tiles with
`tl.range(flatten=True)`, so the next tile's loads overlap this tile's epilogue) and autotuned per
hidden size and token-count bucket over a few configurations chosen by `benchmarks/logprob_sweep.py`.
Under `TRITON_INTERPRET=1` (CPU tests) the same kernels run one tile per program (PERSISTENT=False)
with small fixed tiles and dot operands upcast to fp32 (the interpreter's bf16 `tl.dot` is not
usable, and it cannot loop over runtime bounds).

Padding columns and out-of-range rows are masked with a large negative *finite* sentinel rather
than -inf, so that statistics combine without inf - inf = NaN guards.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from verl_mega.kernels.dispatch import interpret_mode

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
def _fwd_epilogue(acc, pid_m, pid_n, m_ptr, s_ptr, u_ptr, N, V, scale2,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile statistics (m, s, u) of z = acc / T; scale2 = log2(e) / T. Every tile has a column < V."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    z2 = tl.where((rn < V)[None, :], acc * scale2, NEG)  # z * log2(e)
    m2 = tl.max(z2, axis=1)
    d2 = z2 - m2[:, None]
    e = tl.exp2(d2)  # exactly 0 on masked columns (d2 ~ -1e30)
    s = tl.sum(e, axis=1)
    u2 = tl.sum(e * d2, axis=1)
    row_in = rm < N
    out = pid_n * N + rm
    tl.store(m_ptr + out, m2 * LN2, mask=row_in)
    tl.store(s_ptr + out, s, mask=row_in)
    tl.store(u_ptr + out, u2 * LN2, mask=row_in)


@triton.jit
def _grad_part(acc, col0, lse2, glp, c, d, lab, scale2, HAS_ENT: tl.constexpr, WIDTH: tl.constexpr):
    """g = onehot * glp - p * (c + d * acc) for `WIDTH` columns starting at col0 (all fp32)."""
    p = tl.exp2(acc * scale2 - lse2[:, None])
    if HAS_ENT:
        g = -p * (c[:, None] + d[:, None] * acc)
    else:
        g = -p * c[:, None]
    rn = col0 + tl.arange(0, WIDTH)
    return tl.where(rn[None, :] == lab[:, None], g + glp[:, None], g)


@triton.jit
def _bwd_epilogue(acc, pid_m, pid_n, g_desc, lse_ptr, ez_ptr, glp_ptr, gent_ptr, lab_ptr, lab_offset, N, inv_temp,
                  HAS_ENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    """dL/d(raw logits) of the tile, stored by TMA (rows >= N and columns >= V are dropped).

    SPLIT=2 computes and stores the tile in two column halves: half the registers live at once and
    half the shared-memory staging buffer (no spills at 128 x 256 with 8 warps).
    """
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rm < N
    lse2 = tl.load(lse_ptr + rm, mask=row_in, other=0.0) * 1.4426950408889634  # log2(e)
    glp = tl.load(glp_ptr + rm, mask=row_in, other=0.0) * inv_temp
    # The label's column within this chunk, as int32 per row before the per-logit compare (an int64
    # compare per logit costs 5% of the kernel); ids beyond int32 cannot match a column anyway.
    lab = tl.load(lab_ptr + rm, mask=row_in, other=-1) - lab_offset
    lab = tl.minimum(tl.maximum(lab, -1), 2147483647).to(tl.int32)
    if HAS_ENT:
        gent = tl.load(gent_ptr + rm, mask=row_in, other=0.0) * inv_temp
        c = glp - gent * tl.load(ez_ptr + rm, mask=row_in, other=0.0)
        d = gent * inv_temp
    else:
        c = glp
        d = glp
    scale2 = inv_temp * 1.4426950408889634
    col0 = pid_n * BLOCK_N
    if SPLIT == 1:
        g = _grad_part(acc, col0, lse2, glp, c, d, lab, scale2, HAS_ENT, BLOCK_N)
        g_desc.store([pid_m * BLOCK_M, col0], g.to(g_desc.dtype))
    else:
        HALF: tl.constexpr = BLOCK_N // 2
        a0, a1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        g0 = _grad_part(a0, col0, lse2, glp, c, d, lab, scale2, HAS_ENT, HALF)
        g_desc.store([pid_m * BLOCK_M, col0], g0.to(g_desc.dtype))
        g1 = _grad_part(a1, col0 + HALF, lse2, glp, c, d, lab, scale2, HAS_ENT, HALF)
        g_desc.store([pid_m * BLOCK_M, col0 + HALF], g1.to(g_desc.dtype))


@triton.jit
def _fwd_tile(a_desc, b_desc, tile, m_ptr, s_ptr, u_ptr, N, V, H: tl.constexpr, scale2, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, UPCAST: tl.constexpr):
    pid_m, pid_n = _tile_pid(tile, N, V, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _logits_tile(a_desc, b_desc, pid_m, pid_n, H, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
    _fwd_epilogue(acc, pid_m, pid_n, m_ptr, s_ptr, u_ptr, N, V, scale2, BLOCK_M, BLOCK_N)


@triton.jit
def _fwd_kernel(a_desc, b_desc, m_ptr, s_ptr, u_ptr, N, N_BUCKET, V, H: tl.constexpr, scale2,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                PROGS_PER_SM: tl.constexpr, PERSISTENT: tl.constexpr, UPCAST: tl.constexpr):
    """Forward statistics; PERSISTENT: a grid of PROGS_PER_SM programs per SM looping over tiles."""
    if PERSISTENT:
        num_tiles = tl.cdiv(N, BLOCK_M) * tl.cdiv(V, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
            _fwd_tile(a_desc, b_desc, tile, m_ptr, s_ptr, u_ptr, N, V, H, scale2, BLOCK_M, BLOCK_N, BLOCK_K,
                      GROUP_M, UPCAST)
    else:  # one tile per program (the interpreter cannot loop over run-time bounds)
        _fwd_tile(a_desc, b_desc, tl.program_id(0), m_ptr, s_ptr, u_ptr, N, V, H, scale2, BLOCK_M, BLOCK_N,
                  BLOCK_K, GROUP_M, UPCAST)


@triton.jit
def _bwd_tile(a_desc, b_desc, g_desc, tile, lse_ptr, ez_ptr, glp_ptr, gent_ptr, lab_ptr, lab_offset, N, V,
              H: tl.constexpr, inv_temp, HAS_ENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr):
    pid_m, pid_n = _tile_pid(tile, N, V, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _logits_tile(a_desc, b_desc, pid_m, pid_n, H, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
    _bwd_epilogue(acc, pid_m, pid_n, g_desc, lse_ptr, ez_ptr, glp_ptr, gent_ptr, lab_ptr, lab_offset, N, inv_temp,
                  HAS_ENT, BLOCK_M, BLOCK_N, SPLIT)


@triton.jit
def _bwd_kernel(a_desc, b_desc, g_desc, lse_ptr, ez_ptr, glp_ptr, gent_ptr, lab_ptr, lab_offset, N, N_BUCKET, V,
                H: tl.constexpr, inv_temp, HAS_ENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT: tl.constexpr, PROGS_PER_SM: tl.constexpr,
                PERSISTENT: tl.constexpr, UPCAST: tl.constexpr):
    """Gradient of one vocab chunk's logits; PERSISTENT as in `_fwd_kernel`."""
    if PERSISTENT:
        num_tiles = tl.cdiv(N, BLOCK_M) * tl.cdiv(V, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
            _bwd_tile(a_desc, b_desc, g_desc, tile, lse_ptr, ez_ptr, glp_ptr, gent_ptr, lab_ptr, lab_offset, N, V, H,
                      inv_temp, HAS_ENT, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT, UPCAST)
    else:
        _bwd_tile(a_desc, b_desc, g_desc, tl.program_id(0), lse_ptr, ez_ptr, glp_ptr, gent_ptr, lab_ptr, lab_offset,
                  N, V, H, inv_temp, HAS_ENT, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT, UPCAST)


@triton.jit
def _target_kernel(h_ptr, w_ptr, lab_ptr, lab_offset, out_ptr, N, V, H: tl.constexpr, stride_h, stride_w,
                   inv_temp, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[i] = hidden[i] . weight[l_i] * inv_temp (fp32), l_i = label_i - lab_offset, where l_i in [0, V), else 0."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < N
    lab = tl.load(lab_ptr + rows, mask=row_in, other=-1) - lab_offset
    here = row_in & (lab >= 0) & (lab < V)
    cols = tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_R,), tl.float32)
    for k in range(0, H, BLOCK_H):
        msk = here[:, None] & ((k + cols) < H)[None, :]
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + k + cols[None, :], mask=msk, other=0.0)
        w = tl.load(w_ptr + lab[:, None].to(tl.int64) * stride_w + k + cols[None, :], mask=msk, other=0.0)
        acc += tl.sum(h.to(tl.float32) * w.to(tl.float32), axis=1)
    tl.store(out_ptr + rows, acc * inv_temp, mask=row_in)


@triton.jit
def _combine_kernel(m_ptr, s_ptr, u_ptr, out_m, out_s, out_u, N, T: tl.constexpr, BLOCK: tl.constexpr,
                    T_BLOCK: tl.constexpr):
    """Merge T per-tile (m, s, u) rows into one per token row (online-softmax rescaling).

    Each program takes BLOCK rows and reduces T_BLOCK tiles at a time (a [T_BLOCK, BLOCK] block per
    statistic), so the serial loop is T / T_BLOCK steps long.
    """
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_in = rows < N
    M = tl.full((BLOCK,), NEG, tl.float32)
    S = tl.zeros((BLOCK,), tl.float32)
    U = tl.zeros((BLOCK,), tl.float32)
    for t0 in range(0, T, T_BLOCK):
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
    tl.store(out_m + rows, M, mask=row_in)
    tl.store(out_s + rows, S, mask=row_in)
    tl.store(out_u + rows, U, mask=row_in)


# ----------------------------------------------------------------------------- launching
def _set_block_shapes(nargs):
    """TMA descriptors carry the tile shape: set it for the config about to run."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk]
    if "g_desc" in nargs:
        nargs["g_desc"].block_shape = [bm, bn // nargs["SPLIT"]]


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, programs per SM). Chosen by a sweep on H200
# (benchmarks/logprob_sweep.py; notes in benchmarks/results/kernels.md): 128 x 256 tiles with 8 warps
# and 3 stages were fastest in both directions at H = 896 (autotuning picks them at H = 4096 too).
# Slower there: two programs per SM (128 x 128, 4 warps, one program's epilogue overlapping the
# other's main loop), 64-row tiles, BLOCK_K = 128, Triton's Hopper warp specialisation. 4 stages matched 3 over a whole backward
# (A/B: `benchmarks/logprob_sweep.py --stages`) with 229 KB of shared memory per program: not offered.
_FWD_CONFIGS = [(128, 256, 64, 8, 3, 1), (256, 128, 64, 8, 3, 1)]
_BWD_CONFIGS = [(128, 256, 64, 8, 3, 1), (256, 128, 64, 8, 3, 1)]
_SMALL = (128, 128, 64, 8, 4, 1)  # small token counts (tests, short micro-batches): one config, no search


def _config(cfg, forward: bool):
    bm, bn, bk, warps, stages, per_sm = cfg
    # Forward: groups of 32 row blocks (4096 rows) per sweep of the vocabulary, so the whole weight
    # is streamed from memory N / 4096 times instead of N / 1024 (3-5% faster on H200); the
    # backward's chunk of the weight stays in L2 whatever the order.
    kw = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 32 if forward else 8, "PROGS_PER_SM": per_sm}
    if not forward:
        kw["SPLIT"] = 2 if bn >= 256 else 1
    return triton.Config(kw, num_warps=warps, num_stages=stages, pre_hook=_set_block_shapes)


def _prune(configs, named_args, **kwargs):
    """Small token counts (tests, short micro-batches) take one mid-size tile instead of a search."""
    small = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == _SMALL[:2]]
    if named_args["N_BUCKET"] <= 1024:
        return small
    return [c for c in configs if c not in small]


def _tuned(kernel, forward: bool):
    # Tuned per hidden size and power-of-two bucket of the token count (N_BUCKET is otherwise unused).
    cfgs = [_config(c, forward) for c in (_FWD_CONFIGS if forward else _BWD_CONFIGS) + [_SMALL]]
    return triton.autotune(configs=cfgs, key=["H", "N_BUCKET"] + ([] if forward else ["HAS_ENT"]),
                           prune_configs_by={"early_config_prune": _prune})(kernel)


_KERNELS = {True: _tuned(_fwd_kernel, True), False: _tuned(_bwd_kernel, False)}  # forward? -> autotuned kernel
INTERP_SPLIT = 2  # backward epilogue halves under the interpreter (tests also run 1)
_INTERP_TILE = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2, "PROGS_PER_SM": 1}  # interpreter


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch(forward: bool, N, V, tensors, args, kwargs):
    """Launch over TMA descriptors of `tensors` (hidden, weight[, grad out]); returns the BLOCK_N used."""
    interp = interpret_mode()
    tile = _INTERP_TILE if interp else {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}  # GPU: set by pre_hook
    descs = [TensorDescriptor.from_tensor(tensors[0], [tile["BLOCK_M"], tile["BLOCK_K"]]),
             TensorDescriptor.from_tensor(tensors[1], [tile["BLOCK_N"], tile["BLOCK_K"]])]
    if len(tensors) > 2:
        descs.append(TensorDescriptor.from_tensor(tensors[2], [tile["BLOCK_M"], tile["BLOCK_N"]]))
    if interp:
        kernel = _fwd_kernel if forward else _bwd_kernel
        extra = {} if forward else {"SPLIT": INTERP_SPLIT}
        grid = (triton.cdiv(N, tile["BLOCK_M"]) * triton.cdiv(V, tile["BLOCK_N"]),)
        if not forward:
            descs[2].block_shape = [tile["BLOCK_M"], tile["BLOCK_N"] // INTERP_SPLIT]
        kernel[grid](*descs, *args, **kwargs, **tile, **extra, PERSISTENT=False, UPCAST=True)
        return tile["BLOCK_N"]
    kernel = _KERNELS[forward]

    def grid(meta):
        tiles = triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(V, meta["BLOCK_N"])
        return (min(tiles, meta["PROGS_PER_SM"] * _num_sms(tensors[0].device.index or 0)),)

    kernel[grid](*descs, *args, **kwargs, PERSISTENT=True, UPCAST=False)
    return kernel.best_config.kwargs["BLOCK_N"]


def forward_stats(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, label_offset: int,
                  inv_temp: float):
    """Per-row softmax statistics of z = hidden @ weight.T * inv_temp over all rows of `weight`.

    hidden [N, H], weight [V, H] (the shard's valid vocabulary rows; contiguous, 16-byte aligned
    rows, same dtype), labels [N] integer ids whose column here is label - label_offset (anything
    outside [0, V) means "not on this shard"). Returns fp32 [N] tensors (m, s, u, zt): max, sum e^(z-m),
    sum e^(z-m)(z-m), and the label's logit (0 when not here).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    # Upper bound on the tile count (smallest BLOCK_N of any config); unused rows stay untouched.
    max_tiles = triton.cdiv(V, 64 if interpret_mode() else 128)
    parts = torch.empty(3, max_tiles, N, device=dev, dtype=torch.float32)  # [stat, tile, row]
    args = (parts[0], parts[1], parts[2], N, triton.next_power_of_2(N), V, H, inv_temp * LOG2E)
    tiles = triton.cdiv(V, _launch(True, N, V, (hidden, weight), args, {}))
    out = torch.empty(4, N, device=dev, dtype=torch.float32)  # m, s, u, zt
    block = 64
    _combine_kernel[(triton.cdiv(N, block),)](parts[0], parts[1], parts[2], out[0], out[1], out[2], N, tiles,
                                               BLOCK=block, T_BLOCK=16 if interpret_mode() else 32)
    _target_kernel[(triton.cdiv(N, 16),)](hidden, weight, labels, label_offset, out[3], N, V, H, hidden.stride(0),
                                          weight.stride(0), inv_temp, BLOCK_R=16, BLOCK_H=128)
    return out[0], out[1], out[2], out[3]


def grad_logits(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                ez: torch.Tensor | None, g_lp: torch.Tensor, g_ent: torch.Tensor | None,
                labels: torch.Tensor, col_offset: int, inv_temp: float) -> torch.Tensor:
    """Write d(loss)/d(raw logits) for the rows of `weight` (one vocab chunk) into `out` [N, V].

    `out` may be a column slice of a wider buffer (row stride > V, 16-byte aligned). lse, ez, g_lp,
    g_ent are fp32 [N]; labels [N] integer ids, the label's column in this chunk being
    label - col_offset (outside [0, V): not in this chunk).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    has_ent = g_ent is not None
    args = (lse, ez if has_ent else lse, g_lp, g_ent if has_ent else g_lp, labels, col_offset,
            N, triton.next_power_of_2(N), V, H, inv_temp)
    _launch(False, N, V, (hidden, weight, out), args, {"HAS_ENT": has_ent})
    return out
