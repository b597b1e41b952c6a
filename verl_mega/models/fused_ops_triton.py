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
def _rope_row(ptr, bias_ptr, cos, sin, sign, cols, rot, m, HAS_BIAS: tl.constexpr):
    """In place: x (+ bias) -> x * cos + rotate_half(x) * sin over one head row; each product rounded."""
    x = tl.load(ptr + cols, mask=m, other=0.0)
    xr = tl.load(ptr + rot, mask=m, other=0.0)
    dtype = x.dtype
    if HAS_BIAS:
        x = (x.to(tl.float32) + tl.load(bias_ptr + cols, mask=m, other=0.0).to(tl.float32)).to(dtype)
        xr = (xr.to(tl.float32) + tl.load(bias_ptr + rot, mask=m, other=0.0).to(tl.float32)).to(dtype)
    a = (x.to(tl.float32) * cos).to(dtype).to(tl.float32)
    b = (sign * xr.to(tl.float32) * sin).to(dtype).to(tl.float32)
    tl.store(ptr + cols, (a + b).to(dtype), mask=m)


@triton.jit
def rope_qkv_kernel(q_ptr, k_ptr, v_ptr, bq_ptr, bk_ptr, bv_ptr, cos_ptr, sin_ptr, HQ, HK, D, SQ, SK, SV,
                    HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (token t, head h): h < HQ a query head, then HK key heads (RoPE, bias first when
    HAS_BIAS), then HK value heads (bias only; launched only when HAS_BIAS). q/k/v rows are
    [T, H * D] with row strides SQ / SK / SV (unit column stride), cos/sin [T, D] contiguous."""
    tok = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    m = cols < D
    half = D // 2
    rot = tl.where(cols < half, cols + half, cols - half)
    sign = tl.where(cols < half, -1.0, 1.0)
    cos = tl.load(cos_ptr + tok * D + cols, mask=m, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + tok * D + cols, mask=m, other=0.0).to(tl.float32)
    if h < HQ:
        _rope_row(q_ptr + tok * SQ + h * D, bq_ptr + h * D, cos, sin, sign, cols, rot, m, HAS_BIAS)
    elif h < HQ + HK:
        hk = h - HQ
        _rope_row(k_ptr + tok * SK + hk * D, bk_ptr + hk * D, cos, sin, sign, cols, rot, m, HAS_BIAS)
    else:
        hv = h - HQ - HK
        ptr = v_ptr + tok * SV + hv * D
        v = tl.load(ptr + cols, mask=m, other=0.0)
        vb = v.to(tl.float32) + tl.load(bv_ptr + hv * D + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(ptr + cols, vb.to(v.dtype), mask=m)


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
