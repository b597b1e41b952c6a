"""Triton kernels behind `paged_attention.py`, which imports this module on first use (TRITON_INTERPRET is read
when the kernels are decorated). Contracts, the pool-address table and the split scheme: that module's docstring."""

import triton
import triton.language as tl


@triton.jit
def paged_write_kernel(k_ptr, v_ptr, slot_ptr, pools_ptr, layer, sk_b, sk_h, sv_b, sv_h, s_slot,
                       HKV: tl.constexpr, HKV_P: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr):
    """Row b's new K and V [Hkv, D] (strides sk_*, sv_*; unit last stride) into pool slot slot_ptr[b]."""
    b = tl.program_id(0)
    # the pools' base pointers from the address table (paged_attention.py's docstring); allocations are 16-byte aligned
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
def _attend_tile(j, q, acc, m, l, k_ptr, v_ptr, row_table_ptr, length, h, s_slot, s_head, scale,
                 D: tl.constexpr, D_P: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr):
    """Tile j (TILE tokens) of one row and KV head folded into the running (acc [REP_P, D_P], max m, sum l) of
    FlashAttention's online softmax for the row's query heads q [REP_P, D_P]; positions >= length masked."""
    d = tl.arange(0, D_P)
    tok = j * TILE + tl.arange(0, TILE)  # [TILE] positions
    valid = tok < length
    block = tl.load(row_table_ptr + tok // BLOCK, mask=valid, other=0)
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
    return acc * alpha[:, None] + pv, m_new, l * alpha + tl.sum(p, axis=1)


@triton.jit
def paged_decode_kernel(q_ptr, pools_ptr, layer, table_ptr, pos_ptr, out_ptr, part_ptr, stat_ptr,
                        sq_b, sq_h, s_slot, s_head, st_b, so_b, so_h, scale,
                        SPLITS: tl.constexpr, REP: tl.constexpr, REP_P: tl.constexpr, D: tl.constexpr,
                        D_P: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr, IEEE: tl.constexpr,
                        PIPELINED: tl.constexpr):
    b, h, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    k_ptr = tl.multiple_of(tl.load(pools_ptr + layer * 2).to(q_ptr.dtype), 16)  # the pools (as above)
    v_ptr = tl.multiple_of(tl.load(pools_ptr + layer * 2 + 1).to(q_ptr.dtype), 16)
    r = tl.arange(0, REP_P)  # query heads of this KV head (padded to REP_P >= 16 for tl.dot)
    d = tl.arange(0, D_P)  # head dim padded to D_P >= 16 (tl.dot); columns >= D masked
    heads = h * REP + r
    keep = (r < REP)[:, None] & (d < D)[None, :]
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=keep, other=0.0)
    length = (tl.load(pos_ptr + b) + 1).to(tl.int32)
    row_tiles = (length + TILE - 1) // TILE
    per_split = (row_tiles + SPLITS - 1) // SPLITS  # each row's own tiles shared evenly over the splits
    first = split * per_split
    end = tl.minimum(first + per_split, row_tiles)
    m = tl.full([REP_P], float("-inf"), tl.float32)
    l = tl.zeros([REP_P], tl.float32)
    acc = tl.zeros([REP_P, D_P], tl.float32)
    # runtime bounds: a row's tiles past its length are never visited. On the GPU a `for` loop, which Triton
    # software-pipelines (the next tiles' block ids and K/V loads issued while this tile is scored, num_stages
    # deep); the interpreter cannot take tensor bounds in `range`, so it runs the same tiles in a `while` loop.
    if PIPELINED:
        for j in range(first, end):
            acc, m, l = _attend_tile(j, q, acc, m, l, k_ptr, v_ptr, table_ptr + b * st_b, length, h, s_slot, s_head,
                                     scale, D, D_P, BLOCK, TILE, IEEE)
    else:
        j = first
        while j < end:
            acc, m, l = _attend_tile(j, q, acc, m, l, k_ptr, v_ptr, table_ptr + b * st_b, length, h, s_slot, s_head,
                                     scale, D, D_P, BLOCK, TILE, IEEE)
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
