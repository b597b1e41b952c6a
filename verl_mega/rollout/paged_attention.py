"""Decode attention straight from the paged KV pool (flash-decoding over block tables, Triton).

What: for one new query per row, q [B, Hq, D], attend over the row's first `positions[b] + 1` cached
tokens, read through its block table from the pools [slots, Hkv, D]. One program per (row, KV head,
context split): it walks its split's tokens in tiles of TILE tokens (TILE / block_size blocks, their
slots looked up in the table), scores the Hq/Hkv query heads of its KV head against each loaded K tile
with one `tl.dot` (GQA: every K/V byte is read once for the whole group) and keeps FlashAttention's
running max / sum in fp32. A row's tiles past its length are never visited (the loop bound is the
row's own length), so the work follows the actual lengths, not the longest row of the batch. On CUDA
the tile loop is software-pipelined (NUM_STAGES tiles' block ids and K/V loads in flight); the
kernels themselves live in `paged_attention_triton.py`, imported on first use.

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

import math

import torch
import torch.nn.functional as F

from verl_mega.kernels.dispatch import sm_count
from verl_mega.rollout.engine_config import PAGED_TILE

TILE = PAGED_TILE  # tokens per loaded K/V tile (a multiple of the block size; >= 16 for tl.dot)
# Split the context until rows x heads x splits reaches this many programs per SM. 4 was faster at 16-32 rows and
# slower at 64-128 rows of the 7B shape on an H100 (rollout_service.py --attention-sweep, results/h100_2026-12-07i).
MIN_PROGRAMS_PER_SM = 2
MAX_SPLITS = 64  # the merge kernel holds [splits, head_dim] float32 per program: more would spill registers
NUM_WARPS = 4  # the attention kernel's launch (benchmarks/rollout_service.py --attention-sweep measures others)
NUM_STAGES = 2  # K/V tiles in flight per program (software pipelining of the tile loop)
PIPELINE = True  # on CUDA the tile loop is a software-pipelined `for` loop (False: `while`, as in the interpreter)


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


def _kernels():
    from verl_mega.rollout import paged_attention_triton as kernels  # lazy: Triton loads on use

    return kernels.paged_decode_kernel, kernels.merge_splits_kernel, kernels.paged_write_kernel


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
                             BLOCK=block_size, TILE=TILE, IEEE=q.dtype == torch.float32,
                             PIPELINED=PIPELINE and q.device.type == "cuda", num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    if splits > 1:
        merge[(b, hq)](part, stat, out, out.stride(0), out.stride(1), HQ=hq, SPLITS=splits,
                       SPLITS_P=1 << (splits - 1).bit_length(), D=d,
                       D_P=max(16, 1 << (d - 1).bit_length()))
    return out
