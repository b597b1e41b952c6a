"""Attention masks and position ids of the padded (non-packed) decoder forward.

A 1/0 padding mask [B, S_kv] (left padding fine) becomes a boolean causal mask [B, 1, S_q, S_kv]
(`build_attention_mask`); the decoder then turns it into an additive bias once per forward, not once
per layer (`attention_bias`). `position_ids_from_mask` gives the positions transformers uses for left
padding. Packed sequences (`cu_seqlens`) need no mask: see `varlen_attention.py`.
"""

from __future__ import annotations

import torch


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, S] (long) for a 1/0 padding mask [B, S]: 0 at the first real token, as transformers
    does for left padding; pad positions get 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_attention_mask(attention_mask: torch.Tensor | None, attn_mask: torch.Tensor | None,
                         q_len: int, has_cache: bool) -> torch.Tensor | None:
    """Boolean mask [B, 1, S_q, S_kv] (True = attend) or None (plain causal, no padding).

    `attention_mask` [B, S_kv] is a 1/0 padding mask over all keys (cache + new tokens); the new
    queries are its last `q_len` positions and attend causally. An explicit `attn_mask` is used as is.
    Query rows that attend to nothing (pad positions) are opened to every key so SDPA yields finite
    garbage instead of NaN; such rows are never read.
    """
    if attn_mask is not None:
        mask = attn_mask.bool()
    elif attention_mask is not None:
        kv_len = attention_mask.shape[-1]
        rows = torch.arange(q_len, device=attention_mask.device)[:, None] + (kv_len - q_len)
        causal = torch.arange(kv_len, device=attention_mask.device)[None, :] <= rows  # [S_q, S_kv]
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [batch, 1, S_q, S_kv]
    else:
        if has_cache and q_len > 1:
            raise ValueError("with a kv_cache and more than one new token, pass attention_mask or attn_mask")
        return None
    return mask | ~mask.any(dim=-1, keepdim=True)


BIAS_ROW_ALIGNMENT = 16  # elements; SDPA's memory-efficient CUDA kernel wants every stride but the last % 8 == 0


def bias_row(kv_len: int) -> int:
    """Elements per row of `attention_bias`'s buffer for kv_len keys: kv_len rounded up to BIAS_ROW_ALIGNMENT."""
    return -(-kv_len // BIAS_ROW_ALIGNMENT) * BIAS_ROW_ALIGNMENT


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask [B, 1, S_q, S_kv] (True = attend) -> additive mask of `dtype` (0 / -inf), what SDPA adds to the
    scores, same shape.

    SDPA converts a bool mask itself, but per call; the decoder converts once per forward. The result is a view
    of a buffer whose rows are BIAS_ROW_ALIGNMENT-aligned (S_kv rounded up): for a bias whose strides are not
    multiples of 8, PyTorch's memory-efficient attention pads a copy of it on every call (`preprocess_mask` /
    `pad_bias` in aten/src/ATen/native/transformers/cuda/attention.cu): once per layer and forward pass. The
    padded training passes' width P + R is whatever the longest response makes it. One padded micro-batch on an
    H100 runs 4.9% slower at the odd width 1151 with a plain bias, and not slower with this one
    (benchmarks/results/h100_2026-12-07e); whole GRPO steps of width 1150-1151, 11-35% slower than those of width
    1152 before, were 2-6% slower in one call after and up to 25% in the next (-07f), so there is more to it."""
    bias = torch.full((*mask.shape[:-1], bias_row(mask.shape[-1])), float("-inf"), dtype=dtype, device=mask.device)
    return bias[..., :mask.shape[-1]].masked_fill_(mask, 0.0)
