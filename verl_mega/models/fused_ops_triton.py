"""Triton kernels behind `fused_ops.py` (imported lazily: see verl_mega/kernels/dispatch.py on TRITON_INTERPRET).

Every kernel rounds to the activation dtype at the same points as the torch code it replaces, so
on bf16 the results equal the unfused path except for the fp32 summation order of the norm (and
the exp of silu). All offsets are int64 (prefill slices reach 2^31 elements at 7B shapes). Only builtins of
triton.language are used (the row sum via tl.reduce with our own combine function): the
interpreter cannot run the library's own jitted helpers (tl.sum) when triton was imported before
TRITON_INTERPRET was set, as megatron-core's import does.
"""

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, n_cols, eps,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    """One row of [N, n_cols]: (x [+ res] -> sum_ptr), then w * cast(x * rsqrt(mean(x^2) + eps))."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=m, other=0.0)
    if HAS_RES:  # the residual stream: a + b rounded to the activation dtype, as torch's add
        r = tl.load(res_ptr + row * n_cols + cols, mask=m, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * n_cols + cols, x, mask=m)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.reduce(xf * xf, 0, _add) / n_cols + eps)
    y = (xf * inv).to(x_ptr.dtype.element_ty).to(tl.float32)  # cast before the weight (transformers' order)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, (w * y).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rope_heads(ptr, bias_ptr, cos1, sin1, cos2, sin2, n_heads, D, ROTATE: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """In place on one token's n_heads rows of D elements at ptr, as two halves x1 | x2: x (+ bias), then with
    ROTATE x * cos + rotate_half(x) * sin, i.e. x1 * cos1 - x2 * sin1 | x2 * cos2 + x1 * sin2 (cos/sin halves
    [BLOCK_HALF]); each product rounded. Each element is loaded and stored by the same thread (no element is
    read after another thread may have written it)."""
    heads = tl.arange(0, BLOCK_H)
    half = D // 2
    cols = tl.arange(0, BLOCK_HALF)
    m = (heads[:, None] < n_heads) & (cols[None, :] < half)  # [BLOCK_H, BLOCK_HALF]
    at = heads[:, None] * D + cols[None, :]
    x1 = tl.load(ptr + at, mask=m, other=0.0)
    x2 = tl.load(ptr + at + half, mask=m, other=0.0)
    dtype = x1.dtype
    if HAS_BIAS:
        x1 = (x1.to(tl.float32) + tl.load(bias_ptr + at, mask=m, other=0.0).to(tl.float32)).to(dtype)
        x2 = (x2.to(tl.float32) + tl.load(bias_ptr + at + half, mask=m, other=0.0).to(tl.float32)).to(dtype)
    if ROTATE:
        f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
        a1 = (f1 * cos1[None, :]).to(dtype).to(tl.float32)
        b1 = (-f2 * sin1[None, :]).to(dtype).to(tl.float32)
        a2 = (f2 * cos2[None, :]).to(dtype).to(tl.float32)
        b2 = (f1 * sin2[None, :]).to(dtype).to(tl.float32)
        x1, x2 = (a1 + b1).to(dtype), (a2 + b2).to(dtype)
    tl.store(ptr + at, x1, mask=m)
    tl.store(ptr + at + half, x2, mask=m)


@triton.jit
def rope_qkv_kernel(q_ptr, k_ptr, v_ptr, bq_ptr, bk_ptr, bv_ptr, cos_ptr, sin_ptr, HQ, HK, D, SQ, SK, SV,
                    HAS_BIAS: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                    BLOCK_HK: tl.constexpr):
    """Program t: token t's HQ query heads and HK key heads (bias first when HAS_BIAS, then RoPE) and, with
    HAS_BIAS, its HK value heads (bias only). q/k/v rows are [T, H * D] with row strides SQ / SK / SV (unit
    column stride), cos/sin [T, D] contiguous, D even. One program per token, not per head: a decode step's few
    hundred tokens x ~36 heads of 128 elements made thousands of one-warp programs (launch-bound)."""
    tok = tl.program_id(0).to(tl.int64)
    half = D // 2
    cols = tl.arange(0, BLOCK_HALF)
    m = cols < half
    cos1 = tl.load(cos_ptr + tok * D + cols, mask=m, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + tok * D + cols, mask=m, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + tok * D + half + cols, mask=m, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + tok * D + half + cols, mask=m, other=0.0).to(tl.float32)
    _rope_heads(q_ptr + tok * SQ, bq_ptr, cos1, sin1, cos2, sin2, HQ, D, True, HAS_BIAS, BLOCK_HQ, BLOCK_HALF)
    _rope_heads(k_ptr + tok * SK, bk_ptr, cos1, sin1, cos2, sin2, HK, D, True, HAS_BIAS, BLOCK_HK, BLOCK_HALF)
    if HAS_BIAS:
        _rope_heads(v_ptr + tok * SV, bv_ptr, cos1, sin1, cos2, sin2, HK, D, False, True, BLOCK_HK, BLOCK_HALF)


@triton.jit
def silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, COLS, SG, SU, SO, BLOCK: tl.constexpr):
    """out = cast(silu(g)) * u over n elements of [n / COLS, COLS] tensors with row strides SG / SU / SO
    (unit column stride; silu rounded first, as torch's two ops)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    row, col = offs // COLS, offs % COLS
    g = tl.load(g_ptr + row * SG + col, mask=m, other=0.0)
    u = tl.load(u_ptr + row * SU + col, mask=m, other=0.0)
    gf = g.to(tl.float32)
    a = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + row * SO + col, (a * u.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=m)
