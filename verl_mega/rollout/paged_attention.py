"""Decode attention straight from the paged KV pool (one Triton program per (row, KV head)).

What: for one new query per row, q [B, Hq, D], attend over the row's first `positions[b] + 1` cached
tokens, read block by block through its block table from the pools [slots, Hkv, D]; the Hq/Hkv query
heads of a KV head share each loaded K/V block (GQA). Online softmax in fp32 (FlashAttention's
running max / sum), output [B, Hq, D] in q's dtype. Reads every attended K/V byte once, where the
gather path (`kv_cache.PagedKVCache.update` + SDPA, the reference here) reads it, writes a dense copy
and reads that again.

Reference: vLLM's PagedAttention v1 decode kernel (one program per sequence and head, no split over
the context); simplification: no split-K (flash-decoding), so few long rows use few SMs.
The torch reference `paged_decode_attention_reference` is the gather + SDPA path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def paged_decode_attention_reference(q, k_pool, v_pool, tables, positions, block_size: int) -> torch.Tensor:
    """Gather + SDPA: q [B, Hq, D], pools [slots, Hkv, D], tables [B, nb] block ids, positions [B] -> [B, Hq, D]."""
    b, hq, d = q.shape
    hkv, nb = k_pool.shape[1], tables.shape[1]
    slots = (tables[:, :, None] * block_size + torch.arange(block_size, device=q.device)).reshape(b, nb * block_size)
    k, v = k_pool[slots].transpose(1, 2), v_pool[slots].transpose(1, 2)  # [B, Hkv, kv_len, D]
    mask = torch.arange(nb * block_size, device=q.device)[None, :] <= positions[:, None]  # [B, kv_len]
    out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask[:, None, None, :],
                                         enable_gqa=hq != hkv)  # [B, Hq, 1, D]
    return out[:, :, 0]


def _kernel():
    import triton  # lazy: TRITON_INTERPRET is read when the kernel is decorated
    import triton.language as tl

    @triton.jit
    def paged_decode_kernel(q_ptr, k_ptr, v_ptr, table_ptr, pos_ptr, out_ptr, sq_b, sq_h, s_slot, s_head,
                            st_b, so_b, so_h, scale, NB: tl.constexpr, REP: tl.constexpr, REP_P: tl.constexpr,
                            D: tl.constexpr, BLOCK: tl.constexpr):
        b, h = tl.program_id(0), tl.program_id(1)
        r = tl.arange(0, REP_P)
        d = tl.arange(0, D)
        t = tl.arange(0, BLOCK)
        heads = h * REP + r
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=(r < REP)[:, None], other=0.0)
        q = q.to(tl.float32) * scale  # [REP_P, D]
        length = tl.load(pos_ptr + b) + 1
        m = tl.full([REP_P], float("-inf"), tl.float32)
        l = tl.zeros([REP_P], tl.float32)
        acc = tl.zeros([REP_P, D], tl.float32)
        for j in range(0, NB):  # blocks past the row's length are fully masked (no K/V loads)
            block = tl.load(table_ptr + b * st_b + j)
            valid = j * BLOCK + t < length  # [BLOCK]
            offs = (block * BLOCK + t)[:, None] * s_slot + h * s_head + d[None, :]  # [BLOCK, D]
            k = tl.load(k_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [REP_P, BLOCK]
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(v_ptr + offs, mask=valid[:, None], other=0.0).to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            l = l * alpha + tl.sum(p, axis=1)
            m = m_new
        out = acc / l[:, None]
        tl.store(out_ptr + b * so_b + heads[:, None] * so_h + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(r < REP)[:, None])

    return paged_decode_kernel


_KERNEL = []


def paged_decode_attention(q, k_pool, v_pool, tables, positions, block_size: int) -> torch.Tensor:
    """Triton paged decode attention (see the module docstring); same contract as the reference.

    q [B, Hq, D] (any strides with unit last stride), k_pool / v_pool [slots, Hkv, D] contiguous,
    tables [B, nb] int64 block ids covering positions[b] + 1 tokens, positions [B] int64. D and
    block_size must be powers of two.
    """
    b, hq, d = q.shape
    hkv = k_pool.shape[1]
    rep = hq // hkv
    if d & (d - 1) or block_size & (block_size - 1):
        raise ValueError(f"paged attention needs power-of-two head_dim and block_size, got {d}, {block_size}")
    if not _KERNEL:
        _KERNEL.append(_kernel())
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    _KERNEL[0][(b, hkv)](q, k_pool, v_pool, tables, positions, out, q.stride(0), q.stride(1), k_pool.stride(0),
                         k_pool.stride(1), tables.stride(0), out.stride(0), out.stride(1), 1.0 / math.sqrt(d),
                         NB=tables.shape[1], REP=rep, REP_P=max(1, 1 << (rep - 1).bit_length()), D=d, BLOCK=block_size)
    return out
