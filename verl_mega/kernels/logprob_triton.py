"""Triton kernels for the fused vocab-parallel log-prob + entropy (see `logprob.py`).

Two GEMM kernels with fused epilogues over tiles of logits `z = hidden @ weight.T / T`:

- `_fwd_kernel`: one program per [BLOCK_M rows, BLOCK_N vocab] tile computes the tile's logits in
  registers (bf16 `tl.dot`, fp32 accumulation) and writes only per-tile softmax statistics:
  max m, sum-exp s = sum e^(z-m), u = sum e^(z-m)(z-m), and the label's logit where the label falls
  in the tile. No logits reach memory. `_combine_kernel` then merges the tiles of each row.
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

from verl_mega.kernels.dispatch import interpret_mode

NEG = -1.0e30  # "minus infinity" for masked logits: finite, so NEG - NEG = 0, not NaN


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
def _logits_tile(h_ptr, w_ptr, N, V, H: tl.constexpr, stride_h, stride_w, pid_m, pid_n,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
                 IEEE: tl.constexpr):
    """fp32 tile hidden[rows] @ weight[cols].T; out-of-range rows/cols read wrapped (valid) memory."""
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm_in = tl.max_contiguous(tl.multiple_of(rm % N, BLOCK_M), BLOCK_M)
    rn_in = tl.max_contiguous(tl.multiple_of(rn % V, BLOCK_N), BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rm_in[:, None].to(tl.int64) * stride_h + rk[None, :]
    b_ptrs = w_ptr + rn_in[:, None].to(tl.int64) * stride_w + rk[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        if H % BLOCK_K == 0:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_in = (k * BLOCK_K + rk) < H
            a = tl.load(a_ptrs, mask=k_in[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_in[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:  # fp32 inputs: full fp32 products rather than TF32
            acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc, rm, rn


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, lab_ptr, m_ptr, s_ptr, u_ptr, zt_ptr,
                N, N_BUCKET, V, H: tl.constexpr, stride_h, stride_w, n_valid, inv_temp,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                GROUP_M: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_m, pid_n = _tile_ids(N, V, BLOCK_M, BLOCK_N, GROUP_M)
    acc, rm, rn = _logits_tile(h_ptr, w_ptr, N, V, H, stride_h, stride_w, pid_m, pid_n,
                               BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)
    valid = (rn < n_valid)[None, :]
    z = tl.where(valid, acc * inv_temp, NEG)
    m = tl.max(z, axis=1)
    d = z - m[:, None]
    e = tl.where(valid, tl.exp(d), 0.0)
    s = tl.sum(e, axis=1)
    u = tl.sum(tl.where(valid, e * d, 0.0), axis=1)
    row_in = rm < N
    out = pid_n * N + rm
    tl.store(m_ptr + out, m, mask=row_in)
    tl.store(s_ptr + out, s, mask=row_in)
    tl.store(u_ptr + out, u, mask=row_in)
    lab = tl.load(lab_ptr + rm, mask=row_in, other=-1)  # local column of the label, or out of range
    hit = (rn[None, :] == lab[:, None]) & valid
    zt = tl.sum(tl.where(hit, z, 0.0), axis=1)
    has = tl.max(hit.to(tl.int32), axis=1) > 0
    tl.store(zt_ptr + rm, zt, mask=row_in & has)


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
def _bwd_kernel(h_ptr, w_ptr, g_ptr, lse_ptr, ez_ptr, glp_ptr, gent_ptr, lab_ptr,
                N, N_BUCKET, V, H: tl.constexpr, stride_h, stride_w, stride_g, n_valid, inv_temp,
                HAS_ENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    pid_m, pid_n = _tile_ids(N, V, BLOCK_M, BLOCK_N, GROUP_M)
    acc, rm, rn = _logits_tile(h_ptr, w_ptr, N, V, H, stride_h, stride_w, pid_m, pid_n,
                               BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, IEEE)
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
    g_ptrs = g_ptr + rm[:, None].to(tl.int64) * stride_g + rn[None, :]
    tl.store(g_ptrs, g.to(g_ptr.dtype.element_ty), mask=row_in[:, None] & (rn < V)[None, :])


def _configs():
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); the 2-3 stage 128x128 tiles leave room for two
    # programs per SM, so that one's softmax epilogue overlaps the other's main loop.
    cfg = [(128, 256, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 2), (128, 128, 64, 4, 3),
           (256, 128, 64, 8, 3), (64, 256, 64, 4, 3)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in cfg]


# Tuned per hidden size and power-of-two bucket of the token count (N_BUCKET is otherwise unused).
_fwd_tuned = triton.autotune(_configs(), key=["H", "N_BUCKET"])(_fwd_kernel)
_bwd_tuned = triton.autotune(_configs(), key=["H", "N_BUCKET", "HAS_ENT"])(_bwd_kernel)
_INTERP_TILE = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 2}


def _launch(kernel_fixed, kernel_tuned, N, V, args, kwargs):
    """Launch with fixed small tiles under the interpreter, autotuned tiles on GPU."""
    if interpret_mode():
        grid = (triton.cdiv(N, _INTERP_TILE["BLOCK_M"]) * triton.cdiv(V, _INTERP_TILE["BLOCK_N"]),)
        kernel_fixed[grid](*args, **kwargs, **_INTERP_TILE, UPCAST=True, IEEE=False)
        return _INTERP_TILE["BLOCK_N"]
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_M"]) * triton.cdiv(V, meta["BLOCK_N"]),)  # noqa: E731
    kernel_tuned[grid](*args, **kwargs, UPCAST=False, IEEE=args[0].dtype == torch.float32)
    return kernel_tuned.best_config.kwargs["BLOCK_N"]


def forward_stats(hidden: torch.Tensor, weight: torch.Tensor, labels_local: torch.Tensor,
                  n_valid: int, inv_temp: float):
    """Per-row softmax statistics of z = hidden @ weight.T * inv_temp over the first n_valid columns.

    hidden [N, H], weight [V, H] (contiguous, same dtype), labels_local [N] int32 (the label's local
    column; any value outside [0, V) means "not on this shard"). Returns fp32 [N] tensors
    (m, s, u, zt): max, sum e^(z-m), sum e^(z-m)(z-m), and the label's logit (0 when not here).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    # Upper bound on the tile count (smallest BLOCK_N of any config); unused rows stay untouched.
    max_tiles = triton.cdiv(V, 64 if interpret_mode() else 128)
    dev = hidden.device
    parts = torch.empty(3, max_tiles, N, device=dev, dtype=torch.float32)  # [stat, tile, row]
    zt = torch.zeros(N, device=dev, dtype=torch.float32)
    args = (hidden, weight, labels_local, parts[0], parts[1], parts[2], zt, N, triton.next_power_of_2(N), V, H,
            hidden.stride(0), weight.stride(0), n_valid, inv_temp)
    block_n = _launch(_fwd_kernel, _fwd_tuned, N, V, args, {})
    tiles = triton.cdiv(V, block_n)
    out = torch.empty(3, N, device=dev, dtype=torch.float32)
    block = 128
    _combine_kernel[(triton.cdiv(N, block),)](parts[0], parts[1], parts[2], out[0], out[1], out[2], N, tiles,
                                               BLOCK=block)
    return out[0], out[1], out[2], zt


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
    args = (hidden, weight, out, lse, ez if has_ent else lse, g_lp, g_ent if has_ent else g_lp, labels_local,
            N, triton.next_power_of_2(N), V, H, hidden.stride(0), weight.stride(0), out.stride(0), n_valid, inv_temp)
    _launch(_bwd_kernel, _bwd_tuned, N, V, args, {"HAS_ENT": has_ent})
    return out
