"""Triton kernels for the fused vocab-parallel log-prob + entropy (see `logprob.py`).

Two GEMM kernels with fused epilogues over tiles of logits `z = hidden @ weight.T / T`:

- `_fwd_kernel`: one program per [BLOCK_M rows, BLOCK_N vocab] tile computes the tile's logits in
  registers (bf16 `tl.dot`, fp32 accumulation) and writes only per-tile softmax statistics:
  max m, sum-exp s = sum e^(z-m), u = sum e^(z-m)(z-m). No logits reach memory.
  `_combine_kernel` then merges the tiles of each row, and `_target_kernel` computes the label's
  logit as one fp32 dot product per row (cheaper than a search for the label in every tile).
- `_bwd_kernel`: recomputes a tile of logits for one vocab chunk and writes the gradient w.r.t. the
  raw logits, g = (g_lp (onehot - p) - g_ent p (z - E[z])) / T, in the input dtype; the two
  gradient GEMMs (g @ W, g.T @ hidden) are left to cuBLAS.

Padding columns (local id >= n_valid) are masked with a large negative *finite* sentinel rather
than -inf, so that tiles or ranks without a valid column combine without inf - inf = NaN guards.

Under `TRITON_INTERPRET=1` (CPU tests) the same kernels run with small fixed tiles and the dot
operands upcast to fp32 (the interpreter's bf16 `tl.dot` is not usable); on GPU the tile sizes are
autotuned per hidden size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from verl_mega.kernels.dispatch import interpret_mode

NEG = tl.constexpr(-1.0e30)  # "minus infinity" for masked logits: finite, so NEG - NEG = 0, not NaN


@triton.jit
def _tile_ids(N, V, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ordering of the 1-D grid (as in Triton's matmul tutorial) for L2 reuse."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(N, BLOCK_M)
    num_n = tl.cdiv(V, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _logits_tile(a_desc, b_desc, pid_m, pid_n, H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """fp32 tile hidden[rows] @ weight[cols].T via TMA loads (out-of-range rows, cols, k read as 0)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, H, BLOCK_K):
        a = a_desc.load([pid_m * BLOCK_M, k])
        b = b_desc.load([pid_n * BLOCK_N, k])
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:  # fp32 inputs: full fp32 products rather than TF32
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return acc, rm, rn


@triton.jit
def _fwd_kernel(a_desc, b_desc, m_ptr, s_ptr, u_ptr, N, N_BUCKET, V, H: tl.constexpr, n_valid, inv_temp,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_m, pid_n = _tile_ids(N, V, BLOCK_M, BLOCK_N, GROUP_M)
    acc, rm, rn = _logits_tile(a_desc, b_desc, pid_m, pid_n, H, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)
    # Kept to three row reductions: this epilogue is not hidden behind the main loop.
    valid = (rn < n_valid)[None, :]
    z = tl.where(valid, acc * inv_temp, NEG)
    m = tl.max(z, axis=1)
    d = z - m[:, None]
    e = tl.where(valid, tl.exp(d), 0.0)
    s = tl.sum(e, axis=1)
    u = tl.sum(e * d, axis=1)  # e = 0 on masked columns (d is finite there: no 0 * inf)
    row_in = rm < N
    out = pid_n * N + rm
    tl.store(m_ptr + out, m, mask=row_in)
    tl.store(s_ptr + out, s, mask=row_in)
    tl.store(u_ptr + out, u, mask=row_in)


@triton.jit
def _target_kernel(h_ptr, w_ptr, lab_ptr, out_ptr, N, H: tl.constexpr, stride_h, stride_w, inv_temp,
                   BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[i] = hidden[i] . weight[label_i] * inv_temp (fp32) where label_i is on this shard, else 0."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < N
    lab = tl.load(lab_ptr + rows, mask=row_in, other=-1)
    here = row_in & (lab >= 0)
    cols = tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_R,), tl.float32)
    for k in range(0, H, BLOCK_H):
        kin = (k + cols) < H
        msk = here[:, None] & kin[None, :]
        h = tl.load(h_ptr + rows[:, None].to(tl.int64) * stride_h + k + cols[None, :], mask=msk, other=0.0)
        w = tl.load(w_ptr + lab[:, None].to(tl.int64) * stride_w + k + cols[None, :], mask=msk, other=0.0)
        acc += tl.sum(h.to(tl.float32) * w.to(tl.float32), axis=1)
    tl.store(out_ptr + rows, acc * inv_temp, mask=row_in)


@triton.jit
def _combine_kernel(m_ptr, s_ptr, u_ptr, out_m, out_s, out_u, N, T: tl.constexpr, BLOCK: tl.constexpr):
    """Merge T per-tile (m, s, u) rows into one per token row (online-softmax rescaling)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_in = rows < N
    M = tl.full((BLOCK,), NEG, tl.float32)
    S = tl.zeros((BLOCK,), tl.float32)
    U = tl.zeros((BLOCK,), tl.float32)
    for t in range(0, T):
        mt = tl.load(m_ptr + t * N + rows, mask=row_in, other=NEG)
        st = tl.load(s_ptr + t * N + rows, mask=row_in, other=0.0)
        ut = tl.load(u_ptr + t * N + rows, mask=row_in, other=0.0)
        Mn = tl.maximum(M, mt)
        a = tl.exp(M - Mn)
        b = tl.exp(mt - Mn)
        U = a * (U + (M - Mn) * S) + b * (ut + (mt - Mn) * st)
        S = a * S + b * st
        M = Mn
    tl.store(out_m + rows, M, mask=row_in)
    tl.store(out_s + rows, S, mask=row_in)
    tl.store(out_u + rows, U, mask=row_in)


@triton.jit
def _bwd_kernel(a_desc, b_desc, g_desc, lse_ptr, ez_ptr, glp_ptr, gent_ptr, lab_ptr,
                N, N_BUCKET, V, H: tl.constexpr, n_valid, inv_temp,
                HAS_ENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_m, pid_n = _tile_ids(N, V, BLOCK_M, BLOCK_N, GROUP_M)
    acc, rm, rn = _logits_tile(a_desc, b_desc, pid_m, pid_n, H, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)
    row_in = rm < N
    z = acc * inv_temp
    lse = tl.load(lse_ptr + rm, mask=row_in, other=0.0)
    glp = tl.load(glp_ptr + rm, mask=row_in, other=0.0)
    lab = tl.load(lab_ptr + rm, mask=row_in, other=-1)
    p = tl.exp(z - lse[:, None])
    g = glp[:, None] * ((rn[None, :] == lab[:, None]).to(tl.float32) - p)
    if HAS_ENT:
        ez = tl.load(ez_ptr + rm, mask=row_in, other=0.0)
        gent = tl.load(gent_ptr + rm, mask=row_in, other=0.0)
        g -= gent[:, None] * p * (z - ez[:, None])
    g = tl.where((rn < n_valid)[None, :], g * inv_temp, 0.0)
    g_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], g.to(g_desc.dtype))  # rows >= N, cols >= V: dropped


def _configs():
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). The 128x128 tiles with 3 stages leave room for two
    # programs per SM, so that one's softmax epilogue can overlap the other's main loop.
    cfg = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 8, 3), (128, 128, 64, 4, 3),
           (128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (64, 256, 64, 4, 3), (128, 128, 128, 8, 2),
           (64, 64, 32, 4, 3)]  # the last one for fp32 inputs (full-precision dots, no tensor-core tiles)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s,
                          pre_hook=_set_block_shapes) for bm, bn, bk, w, s in cfg]


def _set_block_shapes(nargs):
    """TMA descriptors carry the tile shape: set it for the config about to run."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["a_desc"].block_shape = [bm, bk]
    nargs["b_desc"].block_shape = [bn, bk]
    if "g_desc" in nargs:
        nargs["g_desc"].block_shape = [bm, bn]


def _prune(configs, named_args, **kwargs):
    """fp32 inputs take small tiles; small token counts (tests, short micro-batches) one mid-size tile."""
    def shape(c):
        return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages
    if kwargs.get("IEEE"):
        return [c for c in configs if shape(c) == (64, 64, 32, 4, 3)]
    configs = [c for c in configs if shape(c) != (64, 64, 32, 4, 3)]
    if named_args["N_BUCKET"] <= 1024:
        return [c for c in configs if shape(c) == (128, 128, 64, 8, 3)]
    return configs


# Tuned per hidden size and power-of-two bucket of the token count (N_BUCKET is otherwise unused).
_TUNE = dict(configs=_configs(), prune_configs_by={"early_config_prune": _prune})
_fwd_tuned = triton.autotune(key=["H", "N_BUCKET", "IEEE"], **_TUNE)(_fwd_kernel)
_bwd_tuned = triton.autotune(key=["H", "N_BUCKET", "IEEE", "HAS_ENT"], **_TUNE)(_bwd_kernel)
_INTERP_TILE = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2}  # interpreter: fixed tiles


def _launch(kernel, kernel_tuned, N, V, tensors, args, kwargs):
    """Launch with fixed small tiles under the interpreter, autotuned tiles on GPU.

    tensors: (hidden, weight[, grad_out]) become TMA descriptors (their block shape set per config).
    Returns the BLOCK_N used."""
    interp = interpret_mode()
    tile = _INTERP_TILE if interp else {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}  # GPU: set by pre_hook
    descs = [TensorDescriptor.from_tensor(tensors[0], [tile["BLOCK_M"], tile["BLOCK_K"]]),
             TensorDescriptor.from_tensor(tensors[1], [tile["BLOCK_N"], tile["BLOCK_K"]])]
    if len(tensors) > 2:
        descs.append(TensorDescriptor.from_tensor(tensors[2], [tile["BLOCK_M"], tile["BLOCK_N"]]))
    if interp:
        grid = (triton.cdiv(N, tile["BLOCK_M"]) * triton.cdiv(V, tile["BLOCK_N"]),)
        kernel[grid](*descs, *args, **kwargs, **tile, UPCAST=True, IEEE=False)
        return tile["BLOCK_N"]
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(V, meta["BLOCK_N"]),)  # noqa: E731
    kernel_tuned[grid](*descs, *args, **kwargs, UPCAST=False, IEEE=tensors[0].dtype == torch.float32)
    return kernel_tuned.best_config.kwargs["BLOCK_N"]


def forward_stats(hidden: torch.Tensor, weight: torch.Tensor, labels_local: torch.Tensor,
                  n_valid: int, inv_temp: float):
    """Per-row softmax statistics of z = hidden @ weight.T * inv_temp over the first n_valid columns.

    hidden [N, H], weight [V, H] (contiguous, same dtype), labels_local [N] int32 (the label's local
    column; anything outside [0, n_valid) means "not on this shard"). Returns fp32 [N] tensors
    (m, s, u, zt): max, sum e^(z-m), sum e^(z-m)(z-m), and the label's logit (0 when not here).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    # Upper bound on the tile count (smallest BLOCK_N of any config); unused rows stay untouched.
    max_tiles = triton.cdiv(V, 64 if interpret_mode() else 128)
    parts = torch.empty(3, max_tiles, N, device=dev, dtype=torch.float32)  # [stat, tile, row]
    args = (parts[0], parts[1], parts[2], N, triton.next_power_of_2(N), V, H, n_valid, inv_temp)
    tiles = triton.cdiv(V, _launch(_fwd_kernel, _fwd_tuned, N, V, (hidden, weight), args, {}))
    out = torch.empty(4, N, device=dev, dtype=torch.float32)  # m, s, u, zt
    block = 128
    _combine_kernel[(triton.cdiv(N, block),)](parts[0], parts[1], parts[2], out[0], out[1], out[2], N, tiles,
                                               BLOCK=block)
    labels_here = torch.where(labels_local < n_valid, labels_local, -1)
    _target_kernel[(triton.cdiv(N, 16),)](hidden, weight, labels_here, out[3], N, H, hidden.stride(0),
                                          weight.stride(0), inv_temp, BLOCK_R=16, BLOCK_H=128)
    return out[0], out[1], out[2], out[3]


def grad_logits(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                ez: torch.Tensor | None, g_lp: torch.Tensor, g_ent: torch.Tensor | None,
                labels_local: torch.Tensor, n_valid: int, inv_temp: float) -> torch.Tensor:
    """Write d(loss)/d(raw logits) for the columns of `weight` (one vocab chunk) into `out` [N, V].

    `out` may be a column slice of a wider buffer (row stride > V). lse, ez, g_lp, g_ent are fp32 [N];
    labels_local [N] int32 is the label's column within this chunk (out of range: not here).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    has_ent = g_ent is not None
    args = (lse, ez if has_ent else lse, g_lp, g_ent if has_ent else g_lp, labels_local,
            N, triton.next_power_of_2(N), V, H, n_valid, inv_temp)
    _launch(_bwd_kernel, _bwd_tuned, N, V, (hidden, weight, out), args, {"HAS_ENT": has_ent})
    return out
