"""Fused elementwise ops of the decoder's generation (KV-cache) forward: one Triton kernel each, torch reference beside.

What: a decode step of a small model is dominated by kernel count, not bytes: per layer the torch
code launches ~8 kernels per RMSNorm, ~13 for q/k/v bias + RoPE and 2 for SwiGLU's activation.
These three ops replace them with one launch each:
- `rms_norm(x, weight, eps, residual=None)`: optional residual add (returns the new residual
  stream too) and transformers' RMSNorm (fp32 statistics, cast to the activation dtype before the
  weight multiply);
- `rope_qkv_(q, k, v, cos, sin, biases)`: in place on the q/k/v projections [B, S, heads*head_dim]:
  bias add, rotate-half RoPE on q and k, bias on v;
- `silu_mul(gate, up)`: silu(gate) * up.
The last two take column slices of one stacked projection (rows with a stride) as well as contiguous tensors.
Each rounds to the activation dtype where the torch code does, so the fused and torch paths agree
exactly up to the fp32 summation order inside the norm (and the exp inside silu).

Reference: vLLM's fused_add_rms_norm / rotary_embedding kernels; Liger-Kernel's RMSNorm ("llama"
casting mode).

When: forward only (no autograd). `available(x)` is True for CUDA tensors (Triton importable) and
for CPU tensors under TRITON_INTERPRET=1 (how the CPU tests run the kernels), never while
torch.compile traces (inductor fuses the torch reference itself). The decoder takes this path for
KV-cache forwards under no_grad, i.e. in the generation engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from verl_mega.kernels.dispatch import use_triton


def available(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on `x` (and torch.compile is not tracing)."""
    return not torch.compiler.is_compiling() and use_triton(x)


def _kernels():
    from verl_mega.models import fused_ops_triton  # lazy: TRITON_INTERPRET is read when the kernels are decorated

    return fused_ops_triton


# ---------------------------------------------------------------------------------------------- references
def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Torch version of `rms_norm` (the decoder's unfused arithmetic)."""
    if residual is not None:
        x = residual + x
    x32 = x.float()
    y = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return y if residual is None else (y, x)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, heads, D] rotated by cos/sin [B, S, D] (rotate-half convention, transformers' arithmetic)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rope_qkv_reference(q, k, v, cos, sin, q_bias=None, k_bias=None, v_bias=None):
    """Torch version of `rope_qkv_` (out of place); returns (q, k, v) as [B, S, heads, D]."""
    d = cos.shape[-1]
    b, s = q.shape[:2]
    q, k, v = (t if bias is None else t + bias for t, bias in ((q, q_bias), (k, k_bias), (v, v_bias)))
    q, k, v = (t.view(b, s, -1, d) for t in (q, k, v))  # [batch, seq, heads, head_dim]
    return rope_reference(q, cos, sin), rope_reference(k, cos, sin), v


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# ---------------------------------------------------------------------------------------------- fused
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm over the last dim of x [..., H] with weight [H], one kernel.

    With `residual` (same shape as x): s = residual + x (rounded to x's dtype) is normalised and
    (normed, s) is returned; without: the normed tensor. Output dtype: promote(weight, x).
    """
    n = x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()  # [rows, H]
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res2 = summed = x2
    if residual is not None:
        res2 = residual.reshape(-1, n).contiguous()
        summed = torch.empty_like(x2)
    block = max(16, 1 << (n - 1).bit_length())
    _kernels().rms_norm_kernel[(x2.shape[0],)](x2, res2, weight.contiguous(), out, summed, n, float(eps),
                                               HAS_RES=residual is not None, BLOCK=block,
                                               num_warps=min(16, max(1, block // 512)))
    out = out.view(x.shape)
    return out if residual is None else (out, summed.view(x.shape))


def rope_qkv_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              q_bias: torch.Tensor | None = None, k_bias: torch.Tensor | None = None,
              v_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place on the projections q [B, S, Hq*D], k and v [B, S, Hk*D] (token rows with any stride, unit
    column stride: e.g. column slices of one stacked q/k/v projection): add the biases (all three or none),
    rotate q and k by cos/sin [B, S, D]. Returns views [B, S, heads, D]."""
    b, s, d = cos.shape
    strides = [_row_stride(t) for t in (q, k, v)]
    assert q.shape[:2] == (b, s) and None not in strides, "q/k/v: [B, S, H*D] token rows with unit column stride"
    hq, hk = q.shape[-1] // d, k.shape[-1] // d
    has_bias = q_bias is not None
    assert (k_bias is not None) == has_bias and (v_bias is not None) == has_bias, "biases: all of q/k/v or none"
    cos, sin = cos.contiguous(), sin.contiguous()
    bq, bk, bv = (q_bias, k_bias, v_bias) if has_bias else (q, k, v)  # unused pointers when no bias
    assert d % 2 == 0, f"RoPE needs an even head_dim, got {d}"
    pow2 = lambda n: 1 << max(0, n - 1).bit_length()  # noqa: E731
    block_half = max(16, pow2(d // 2))
    _kernels().rope_qkv_kernel[(b * s,)](q, k, v, bq, bk, bv, cos, sin, hq, hk, d, *strides, HAS_BIAS=has_bias,
                                         BLOCK_HALF=block_half, BLOCK_HQ=max(2, pow2(hq)), BLOCK_HK=max(2, pow2(hk)),
                                         num_warps=4 if pow2(hq) * block_half >= 1024 else 1)
    return q.view(b, s, hq, d), k.view(b, s, hk, d), v.view(b, s, hk, d)  # [batch, seq, heads, head_dim]


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for same-shape gate/up [..., I] (rows with any stride, unit column stride: e.g. the
    two halves of one stacked gate/up projection), one kernel. Overwrites gate and returns it."""
    if _row_stride(gate) is None or _row_stride(up) is None:
        gate, up = gate.contiguous(), up.contiguous()
    cols = gate.shape[-1]
    g2, u2 = gate.view(-1, cols), up.view(-1, cols)  # [rows, I]
    n, block = gate.numel(), 1024
    _kernels().silu_mul_kernel[(_cdiv(n, block),)](g2, u2, g2, n, cols, g2.stride(0), u2.stride(0), g2.stride(0),
                                                   BLOCK=block, num_warps=4)
    return gate


def _row_stride(t: torch.Tensor) -> int | None:
    """The row stride of t [..., C] read as rows [numel / C, C] (a contiguous tensor, or a column slice of one);
    None if its leading dims do not make one row stride or its columns are not unit-strided."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return None
    row = expected = None
    for size, stride in zip(reversed(t.shape[:-1]), reversed(t.stride()[:-1])):
        if size == 1:
            continue
        if expected is None:
            row = expected = stride
        elif stride != expected:
            return None
        expected *= size
    return t.shape[-1] if row is None else row


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
