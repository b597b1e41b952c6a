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
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr):
    """Tile statistics (m, s, u) of z = acc / T; scale2 = log2(e) / T. Every tile has a column < V.

    MASK: some columns of the tile may lie beyond V (only the last column block needs it).
    The max is taken on the raw accumulator (scale2 > 0), so that z * log2(e) - max is one FMA.
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
    row_in = rm < N
    out = pid_n * N + rm
    tl.store(m_ptr + out, m2 * LN2, mask=row_in)
    tl.store(s_ptr + out, s, mask=row_in)
    tl.store(u_ptr + out, u2 * LN2, mask=row_in)


@triton.jit
def _grad_part(acc, col0, lse2, glp, c, d, lab, scale2, HAS_ENT: tl.constexpr, WIDTH: tl.constexpr,
               ONEHOT: tl.constexpr):
    """g = -p * (c + d * acc) (+ glp at the label's column if ONEHOT) for `WIDTH` columns from col0 (fp32)."""
    p = tl.exp2(acc * scale2 - lse2[:, None])
    if HAS_ENT:
        g = -p * (c[:, None] + d[:, None] * acc)
    else:
        g = -p * c[:, None]
    if ONEHOT:
        rn = col0 + tl.arange(0, WIDTH)
        g = tl.where(rn[None, :] == lab[:, None], g + glp[:, None], g)
    return g


@triton.jit
def _bwd_epilogue(acc, pid_m, pid_n, g_desc, lse_ptr, ez_ptr, glp_ptr, gent_ptr, lab_ptr, lab_offset, N, inv_temp,
                  HAS_ENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
                  ONEHOT: tl.constexpr):
    """dL/d(raw logits) of the tile, stored by TMA (rows >= N and columns >= V are dropped).

    ONEHOT=False leaves out the label term (g_lp / T at each row's label column): production writes
    those N values afterwards with `_label_grad_kernel`, which spares a compare and a select per
    logit here. SPLIT=2 computes and stores the tile in two column halves: half the registers live at
    once and half the shared-memory staging buffer (no spills at 128 x 256 with 8 warps).
    """
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_in = rm < N
    lse2 = tl.load(lse_ptr + rm, mask=row_in, other=0.0) * 1.4426950408889634  # log2(e)
    glp = tl.load(glp_ptr + rm, mask=row_in, other=0.0) * inv_temp
    if ONEHOT:
        # The label's column within this chunk, as int32 per row before the per-logit compare (an
        # int64 compare per logit costs 5% of the kernel); ids beyond int32 cannot match a column.
        lab = tl.load(lab_ptr + rm, mask=row_in, other=-1) - lab_offset
        lab = tl.minimum(tl.maximum(lab, -1), 2147483647).to(tl.int32)
    else:
        lab = rm  # unused
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
        g = _grad_part(acc, col0, lse2, glp, c, d, lab, scale2, HAS_ENT, BLOCK_N, ONEHOT)
        g_desc.store([pid_m * BLOCK_M, col0], g.to(g_desc.dtype))
    else:
        HALF: tl.constexpr = BLOCK_N // 2
        a0, a1 = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, HALF)), (0, 2, 1)))
        g0 = _grad_part(a0, col0, lse2, glp, c, d, lab, scale2, HAS_ENT, HALF, ONEHOT)
        g_desc.store([pid_m * BLOCK_M, col0], g0.to(g_desc.dtype))
        g1 = _grad_part(a1, col0 + HALF, lse2, glp, c, d, lab, scale2, HAS_ENT, HALF, ONEHOT)
        g_desc.store([pid_m * BLOCK_M, col0 + HALF], g1.to(g_desc.dtype))


@triton.jit
def _label_grad_kernel(g_ptr, ld_g, lab_ptr, lab_offset, zt_ptr, lse_ptr, ez_ptr, glp_ptr, gent_ptr, N, V, inv_temp,
                       HAS_ENT: tl.constexpr, BLOCK: tl.constexpr):
    """The label column of each row of a gradient chunk g [N, V] (row stride ld_g), written in place.

    Row i's label column l_i = label_i - lab_offset (rows with l_i outside [0, V) are left alone) gets
    the full gradient g_lp/T - p (c + g_ent z / T) computed from per-row fp32 values: z = z_{i, l_i}
    (the forward's label logit), p = exp(z - lse), c as in `_bwd_epilogue`. One element per row:
    no two programs touch the same element.
    """
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_in = rows < N
    lab = tl.load(lab_ptr + rows, mask=row_in, other=-1) - lab_offset
    here = row_in & (lab >= 0) & (lab < V)
    z = tl.load(zt_ptr + rows, mask=here, other=0.0)
    p = tl.exp(z - tl.load(lse_ptr + rows, mask=here, other=0.0))
    glp = tl.load(glp_ptr + rows, mask=here, other=0.0) * inv_temp
    if HAS_ENT:
        gent = tl.load(gent_ptr + rows, mask=here, other=0.0) * inv_temp
        g = glp - p * (glp - gent * tl.load(ez_ptr + rows, mask=here, other=0.0) + gent * z)
    else:
        g = glp - p * glp
    lab = tl.where(here, lab, 0)
    tl.store(g_ptr + rows.to(tl.int64) * ld_g + lab, g.to(g_ptr.dtype.element_ty), mask=here)


@triton.jit
def _fwd_tile(a_desc, b_desc, tile, m_ptr, s_ptr, u_ptr, N, V, H: tl.constexpr, scale2, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, UPCAST: tl.constexpr,
              MASK: tl.constexpr = True):
    pid_m, pid_n = _tile_pid(tile, N, V, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _logits_tile(a_desc, b_desc, pid_m, pid_n, H, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
    _fwd_epilogue(acc, pid_m, pid_n, m_ptr, s_ptr, u_ptr, N, V, scale2, BLOCK_M, BLOCK_N, MASK)


@triton.jit
def _fwd_kernel(a_desc, b_desc, m_ptr, s_ptr, u_ptr, N, N_BUCKET, V, H: tl.constexpr, scale2,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                PROGS_PER_SM: tl.constexpr, PERSISTENT: tl.constexpr, UPCAST: tl.constexpr, MASK: tl.constexpr):
    """Forward statistics; PERSISTENT: a grid of PROGS_PER_SM programs per SM looping over tiles.
    MASK=False: V is a multiple of BLOCK_N (no column test per logit)."""
    if PERSISTENT:
        num_tiles = tl.cdiv(N, BLOCK_M) * tl.cdiv(V, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
            _fwd_tile(a_desc, b_desc, tile, m_ptr, s_ptr, u_ptr, N, V, H, scale2, BLOCK_M, BLOCK_N, BLOCK_K,
                      GROUP_M, UPCAST, MASK)
    else:  # one tile per program (the interpreter cannot loop over run-time bounds)
        _fwd_tile(a_desc, b_desc, tl.program_id(0), m_ptr, s_ptr, u_ptr, N, V, H, scale2, BLOCK_M, BLOCK_N,
                  BLOCK_K, GROUP_M, UPCAST, MASK)


@triton.jit
def _bwd_tile(a_desc, b_desc, g_desc, tile, lse_ptr, ez_ptr, glp_ptr, gent_ptr, lab_ptr, lab_offset, N, V,
              H: tl.constexpr, inv_temp, HAS_ENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
              ONEHOT: tl.constexpr = False):
    pid_m, pid_n = _tile_pid(tile, N, V, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _logits_tile(a_desc, b_desc, pid_m, pid_n, H, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST)
    _bwd_epilogue(acc, pid_m, pid_n, g_desc, lse_ptr, ez_ptr, glp_ptr, gent_ptr, lab_ptr, lab_offset, N, inv_temp,
                  HAS_ENT, BLOCK_M, BLOCK_N, SPLIT, ONEHOT)


@triton.jit
def _bwd_kernel(a_desc, b_desc, g_desc, lse_ptr, ez_ptr, glp_ptr, gent_ptr, N, N_BUCKET, V, H: tl.constexpr, inv_temp,
                HAS_ENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr, SPLIT: tl.constexpr, PROGS_PER_SM: tl.constexpr, PERSISTENT: tl.constexpr,
                UPCAST: tl.constexpr):
    """Gradient of one vocab chunk's logits without the label term (`_label_grad_kernel` adds it);
    PERSISTENT as in `_fwd_kernel`."""
    if PERSISTENT:
        num_tiles = tl.cdiv(N, BLOCK_M) * tl.cdiv(V, BLOCK_N)
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
            _bwd_tile(a_desc, b_desc, g_desc, tile, lse_ptr, ez_ptr, glp_ptr, gent_ptr, None, 0, N, V, H,
                      inv_temp, HAS_ENT, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT, UPCAST, False)
    else:
        _bwd_tile(a_desc, b_desc, g_desc, tl.program_id(0), lse_ptr, ez_ptr, glp_ptr, gent_ptr, None, 0, N, V, H,
                  inv_temp, HAS_ENT, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT, UPCAST, False)


@triton.jit
def _rows_kernel(m_ptr, s_ptr, u_ptr, h_ptr, w_ptr, lab_ptr, lab_offset, out_ptr, N, V, H: tl.constexpr, stride_h,
                 stride_w, inv_temp, T: tl.constexpr, BLOCK: tl.constexpr, T_BLOCK: tl.constexpr,
                 BLOCK_H: tl.constexpr):
    """Per row: merge the T per-tile (m, s, u) statistics, and compute the label's logit.

    out [4, N] fp32 = (m, s, u, zt). Statistics: online-softmax rescaling, T_BLOCK tiles at a time
    (a [T_BLOCK, BLOCK] block per statistic), so the serial loop is T / T_BLOCK steps long.
    zt_i = hidden[i] . weight[l_i] * inv_temp in fp32 with l_i = label_i - lab_offset where l_i is
    in [0, V), else 0 (cheaper than looking for the label in every tile of the GEMM).
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
    tl.store(out_ptr + 3 * N + rows, zt * inv_temp, mask=row_in)


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
# other's main loop), 64-row tiles, BLOCK_K = 128, Triton's Hopper warp specialisation. 4 stages
# matched 3 over a whole backward (A/B: `benchmarks/logprob_sweep.py --stages`) with 229 KB of shared
# memory per program: not offered.
_FWD_CONFIGS = [(128, 256, 64, 8, 3, 1), (256, 128, 64, 8, 3, 1)]
_BWD_CONFIGS = [(128, 256, 64, 8, 3, 1), (256, 128, 64, 8, 3, 1)]
_SMALL = (128, 128, 64, 8, 4, 1)  # small token counts (tests, short micro-batches): one config, no search
UNMASKED_MIN_ROWS = 4096  # forward: from this many rows on, the columns before the last partial tile run unmasked
_WIDEST_BLOCK_N = max(c[1] for c in _FWD_CONFIGS + [_SMALL])
assert all(_WIDEST_BLOCK_N % c[1] == 0 for c in _FWD_CONFIGS + [_SMALL])


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
    # Not keyed on the forward's MASK: the masked tail launch reuses the main launch's configuration
    # (a new key would mean another search, and compiles, in the middle of training).
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
    # The columns up to a multiple of the widest BLOCK_N (a multiple of every BLOCK_N) need no column
    # mask; the few after them (< 256) take a second launch with the mask, its tiles stored after.
    # Small N: one masked launch (a second launch costs more host time than the mask costs the GPU).
    width = _INTERP_TILE["BLOCK_N"] if interpret_mode() else _WIDEST_BLOCK_N
    v_main = V // width * width if N >= UNMASKED_MIN_ROWS else 0
    tiles = 0
    for c0, c1, mask in ((0, v_main, False), (v_main, V, True)):
        if c1 > c0:
            args = (parts[0, tiles:], parts[1, tiles:], parts[2, tiles:], N, triton.next_power_of_2(N), c1 - c0, H,
                    inv_temp * LOG2E)
            tiles += triton.cdiv(c1 - c0, _launch(True, N, c1 - c0, (hidden, weight[c0:c1]), args, {"MASK": mask}))
    return _finish_rows(parts, tiles, hidden, weight, labels, label_offset, inv_temp)


def _finish_rows(parts, tiles: int, hidden, weight, labels, label_offset: int, inv_temp: float):
    """(m, s, u, zt) fp32 [N] from the per-tile statistics parts [3, >= tiles, N] (see `_rows_kernel`)."""
    N, H = hidden.shape
    out = torch.empty(4, N, device=hidden.device, dtype=torch.float32)
    block = 32
    _rows_kernel[(triton.cdiv(N, block),)](parts[0], parts[1], parts[2], hidden, weight, labels, label_offset, out, N,
                                           weight.shape[0], H, hidden.stride(0), weight.stride(0), inv_temp, T=tiles,
                                           BLOCK=block, T_BLOCK=16 if interpret_mode() else 32, BLOCK_H=128)
    return out[0], out[1], out[2], out[3]


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
    args = (lse, ez, g_lp, g_ent, N, triton.next_power_of_2(N), V, H, inv_temp)
    _launch(False, N, V, (hidden, weight, out), args, {"HAS_ENT": has_ent})
    block = 128
    _label_grad_kernel[(triton.cdiv(N, block),)](out, out.stride(0), labels, col_offset, label_logit, lse, ez, g_lp,
                                                 g_ent, N, V, inv_temp, HAS_ENT=has_ent, BLOCK=block)
    return out
