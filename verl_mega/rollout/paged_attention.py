"""Decode attention straight from the paged KV pool (flash-decoding over block tables, Triton).

What: for one new query per row, q [B, Hq, D], attend over the row's first `positions[b] + 1` cached
tokens, read through its block table from the pools [slots, Hkv, D]. One program per (row, KV head,
context split): it walks its split's tokens in tiles of TILE tokens (TILE / block_size blocks, their
slots looked up in the table), scores the Hq/Hkv query heads of its KV head against each loaded K tile
with one `tl.dot` (GQA: every K/V byte is read once for the whole group) and keeps FlashAttention's
running max / sum in fp32. A row's tiles past its length are never visited (the loop bound is the
row's own length), so the work follows the actual lengths, not the longest row of the batch.

Splits (flash-decoding, Dao et al. 2023): when rows x KV heads alone would leave SMs idle (few rows,
e.g. the tail of a rollout), each row's context is split over SPLITS programs per (row, head), each taking
an equal share of that row's own tiles (so a table wider than the rows' lengths, e.g. one sized for the
longest possible sequence so that a CUDA graph serves every length, costs only empty programs); each writes
an unnormalised partial (acc, max, sum) and a second kernel merges them. With enough rows SPLITS = 1 and
the first kernel writes the normalised output directly.

Pools by address: both kernels here (the decode attention and `paged_write`, which stores each row's new
K/V) reach the pools through a table of their data pointers (`PagedKVCache.addresses`, read in the kernel), not
through pointer arguments. A CUDA graph of a decode step therefore holds the table's address, not the pools',
and stays valid when the cache is freed for training and re-allocated for the next rollout: the engine keeps its
graphs instead of recapturing them every step.

Reads every attended K/V byte once, where the gather path (`kv_cache.PagedKVCache.update` + SDPA, the
reference here) reads it, writes a dense copy padded to the batch's longest row and reads that again.

Reference: vLLM's PagedAttention; FlashDecoding's split-K. The torch reference
`paged_decode_attention_reference` is the gather + SDPA path.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from verl_mega.kernels.dispatch import sm_count
from verl_mega.rollout.engine_config import PAGED_TILE

TILE = PAGED_TILE  # tokens per loaded K/V tile (a multiple of the block size; >= 16 for tl.dot)
MIN_PROGRAMS_PER_SM = 2  # split the context until rows x heads x splits reaches this many programs per SM
MAX_SPLITS = 64  # the merge kernel holds [splits, head_dim] float32 per program: more would spill registers


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


@functools.cache
def _kernels():
    import triton  # lazy: TRITON_INTERPRET is read when the kernel is decorated
    import triton.language as tl

    @triton.jit
    def paged_write_kernel(k_ptr, v_ptr, slot_ptr, pools_ptr, layer, sk_b, sk_h, sv_b, sv_h, s_slot,
                           HKV: tl.constexpr, HKV_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr):
        """Row b's new K and V [Hkv, D] (strides sk_*, sv_*; unit last stride) into pool slot slot_ptr[b]."""
        b = tl.program_id(0)
        # the pools' base pointers from the address table (module docstring); allocations are 16-byte aligned
        k_pool = tl.multiple_of(tl.load(pools_ptr + layer * 2).to(k_ptr.dtype), 16)
        v_pool = tl.multiple_of(tl.load(pools_ptr + layer * 2 + 1).to(k_ptr.dtype), 16)
        h = tl.arange(0, HKV_P)[:, None]
        d = tl.arange(0, D_P)[None, :]
        mask = (h < HKV) & (d < D)
        slot = tl.load(slot_ptr + b)
        dst = slot * s_slot + h * D + d
        tl.store(k_pool + dst, tl.load(k_ptr + b * sk_b + h * sk_h + d, mask=mask), mask=mask)
        tl.store(v_pool + dst, tl.load(v_ptr + b * sv_b + h * sv_h + d, mask=mask), mask=mask)

    @triton.jit
    def paged_decode_kernel(q_ptr, pools_ptr, layer, table_ptr, pos_ptr, out_ptr, part_ptr, stat_ptr,
                            sq_b, sq_h, s_slot, s_head, st_b, so_b, so_h, scale,
                            SPLITS: tl.constexpr, REP: tl.constexpr, REP_P: tl.constexpr, D: tl.constexpr,
                            D_P: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr):
        b, h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        k_ptr = tl.multiple_of(tl.load(pools_ptr + layer * 2).to(q_ptr.dtype), 16)  # the pools (module docstring)
        v_ptr = tl.multiple_of(tl.load(pools_ptr + layer * 2 + 1).to(q_ptr.dtype), 16)
        r = tl.arange(0, REP_P)  # query heads of this KV head (padded to REP_P >= 16 for tl.dot)
        d = tl.arange(0, D_P)  # head dim padded to D_P >= 16 (tl.dot); columns >= D masked
        t = tl.arange(0, TILE)
        heads = h * REP + r
        keep = (r < REP)[:, None] & (d < D)[None, :]
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=keep, other=0.0)
        length = (tl.load(pos_ptr + b) + 1).to(tl.int32)
        row_tiles = (length + TILE - 1) // TILE
        per_split = (row_tiles + SPLITS - 1) // SPLITS  # each row's own tiles shared evenly over the splits
        j = split * per_split
        end = tl.minimum(j + per_split, row_tiles)
        m = tl.full([REP_P], float("-inf"), tl.float32)
        l = tl.zeros([REP_P], tl.float32)
        acc = tl.zeros([REP_P, D_P], tl.float32)
        while j < end:  # runtime bound: a row's tiles past its length are never visited
            tok = j * TILE + t  # [TILE] positions
            valid = tok < length
            block = tl.load(table_ptr + b * st_b + tok // BLOCK, mask=valid, other=0)
            offs = (block * BLOCK + tok % BLOCK)[:, None] * s_slot + h * s_head + d[None, :]  # [TILE, D]
            kv_mask = valid[:, None] & (d < D)[None, :]
            k = tl.load(k_ptr + offs, mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))  # [REP_P, TILE] fp32
            s = tl.where(valid[None, :], s * scale, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(v_ptr + offs, mask=kv_mask, other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)  # [REP_P, D]
            acc = acc * alpha[:, None] + pv
            l = l * alpha + tl.sum(p, axis=1)
            m = m_new
            j += 1
        if SPLITS == 1:
            tl.store(out_ptr + b * so_b + heads[:, None] * so_h + d[None, :],
                     (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=keep)
        else:  # partials [B, Hq, SPLITS, D] and stats [B, Hq, SPLITS, 2] (max, sum); empty splits: -inf, 0
            row = (b * (REP * tl.num_programs(1)) + heads) * SPLITS + split  # [REP_P]
            tl.store(part_ptr + row[:, None] * D + d[None, :], acc, mask=keep)
            tl.store(stat_ptr + row * 2, m, mask=r < REP)
            tl.store(stat_ptr + row * 2 + 1, l, mask=r < REP)

    @triton.jit
    def merge_splits_kernel(part_ptr, stat_ptr, out_ptr, so_b, so_h, HQ: tl.constexpr, SPLITS: tl.constexpr,
                            SPLITS_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr):
        b, head = tl.program_id(0), tl.program_id(1)
        s = tl.arange(0, SPLITS_P)
        d = tl.arange(0, D_P)
        row = (b * HQ + head) * SPLITS + s  # [SPLITS_P]
        m = tl.load(stat_ptr + row * 2, mask=s < SPLITS, other=float("-inf"))
        l = tl.load(stat_ptr + row * 2 + 1, mask=s < SPLITS, other=0.0)
        acc = tl.load(part_ptr + row[:, None] * D + d[None, :], mask=(s < SPLITS)[:, None] & (d < D)[None, :],
                      other=0.0)
        top = tl.max(m, axis=0)  # split 0 always holds position 0: finite
        w = tl.where(s < SPLITS, tl.exp(m - top), 0.0)  # empty splits: exp(-inf) = 0
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(out_ptr + b * so_b + head * so_h + d, out.to(out_ptr.dtype.element_ty), mask=d < D)

    return paged_decode_kernel, merge_splits_kernel, paged_write_kernel


def num_splits(rows: int, kv_heads: int, max_tiles: int, device: torch.device) -> int:
    """Context splits per (row, KV head): enough programs for MIN_PROGRAMS_PER_SM per SM, at most one per tile
    and MAX_SPLITS."""
    if device.type != "cuda":
        return 1 if max_tiles < 2 else 2  # the interpreter: exercise the split path cheaply
    want = -(-MIN_PROGRAMS_PER_SM * sm_count(device) // max(1, rows * kv_heads))
    return max(1, min(want, max_tiles, MAX_SPLITS))


def pool_addresses(k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
    """The pool-address table of one layer, [1, 2] int64 on the pools' device: (K pool, V pool) data pointers."""
    return torch.tensor([[k_pool.data_ptr(), v_pool.data_ptr()]], dtype=torch.int64, device=k_pool.device)


def _check_pools(k_pool: torch.Tensor, v_pool: torch.Tensor, dtype: torch.dtype) -> None:
    if not (k_pool.is_contiguous() and v_pool.is_contiguous()) or not k_pool.dtype == v_pool.dtype == dtype:
        raise ValueError(f"paged attention needs contiguous pools of the new keys' dtype {dtype}, got "
                         f"{k_pool.dtype} / {v_pool.dtype}")


def paged_write(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                addresses: torch.Tensor | None = None, layer: int = 0) -> None:
    """Write each row's new key and value, k / v [B, Hkv, D] (unit last stride), into pool slot slots[b] ([B]
    int64) of k_pool / v_pool [slots, Hkv, D]; the pools are reached through `addresses` as in
    `paged_decode_attention`."""
    b, hkv, d = k.shape
    _check_pools(k_pool, v_pool, k.dtype)
    if k.stride(-1) != 1 or v.stride(-1) != 1 or v.shape != k.shape or k_pool.shape[1:] != (hkv, d):
        raise ValueError(f"paged_write needs k, v [B, Hkv, D] with unit last stride matching the pools' "
                         f"{tuple(k_pool.shape[1:])}, got {tuple(k.shape)} / {tuple(v.shape)}")
    addresses = pool_addresses(k_pool, v_pool) if addresses is None else addresses
    write = _kernels()[2]
    write[(b,)](k, v, slots, addresses, layer, k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_pool.stride(0),
                HKV=hkv, HKV_P=1 << (hkv - 1).bit_length(), D=d, D_P=max(16, 1 << (d - 1).bit_length()))


def paged_decode_attention(q, k_pool, v_pool, tables, positions, block_size: int, addresses: torch.Tensor | None = None,
                           layer: int = 0) -> torch.Tensor:
    """Triton paged decode attention (see the module docstring); same contract as the reference.

    q [B, Hq, D] (any strides with unit last stride), k_pool / v_pool [slots, Hkv, D] contiguous, of q's dtype,
    tables [B, nb] int64 block ids covering positions[b] + 1 tokens, positions [B] int64; block_size must
    divide TILE.
    addresses: the pool-address table [layers, 2] int64 on q's device (`PagedKVCache.addresses`) whose row
    `layer` holds k_pool's and v_pool's data pointers: the kernel reads the pools through it, so a CUDA graph
    captured here stays valid when the pools are freed and re-allocated (same shape) and the row rewritten.
    None: a table built for these pools (eager calls).
    """
    b, hq, d = q.shape
    hkv = k_pool.shape[1]
    rep = hq // hkv
    if TILE % block_size:
        raise ValueError(f"paged attention needs a block_size dividing {TILE}, got {block_size}")
    if hq % hkv or q.stride(-1) != 1:
        raise ValueError(f"paged attention needs query heads a multiple of KV heads (got {hq}, {hkv}) and q with "
                         f"unit last stride")
    _check_pools(k_pool, v_pool, q.dtype)
    if tables.dtype != torch.int64:  # slot offsets are computed from the table entries: int32 would overflow
        raise ValueError(f"paged attention needs int64 block tables, got {tables.dtype}")
    attend, merge, _ = _kernels()
    addresses = pool_addresses(k_pool, v_pool) if addresses is None else addresses
    max_tiles = -(-tables.shape[1] * block_size // TILE)
    splits = num_splits(b, hkv, max_tiles, q.device)
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    part = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device) if splits > 1 else out
    stat = torch.empty(b, hq, splits, 2, dtype=torch.float32, device=q.device) if splits > 1 else out
    attend[(b, hkv, splits)](q, addresses, layer, tables, positions, out, part, stat, q.stride(0), q.stride(1),
                             k_pool.stride(0), k_pool.stride(1), tables.stride(0), out.stride(0), out.stride(1),
                             1.0 / math.sqrt(d), SPLITS=splits, REP=rep,
                             REP_P=max(16, 1 << (rep - 1).bit_length()), D=d, D_P=max(16, 1 << (d - 1).bit_length()),
                             BLOCK=block_size, TILE=TILE,
                             IEEE=q.dtype == torch.float32)
    if splits > 1:
        merge[(b, hq)](part, stat, out, out.stride(0), out.stride(1), HQ=hq, SPLITS=splits,
                       SPLITS_P=1 << (splits - 1).bit_length(), D=d,
                       D_P=max(16, 1 << (d - 1).bit_length()))
    return out
