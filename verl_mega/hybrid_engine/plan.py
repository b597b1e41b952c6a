"""Resharding plan: what each rank packs into its gather chunk, in which bucket, and where every
inference parameter's pieces lie in the gathered buffers.

Chunk layout (`send_order`). Each sender packs, back to back, the TP shards it sends by decreasing
size, then the replicated tensors it is the designated sender of. The r = t/t_g training TP ranks of
one stage inside a micro-DP group send the same list of TP tensors, so each TP tensor sits at the
same chunk offset on all of them.

Buckets (`bucketize`). The chunk is cut greedily into buckets of about `bucket_elems`; bucket k of
all members is gathered by one all-gather of equal segments (padded to the largest), so bucket k+1
can be gathered while bucket k is assembled. One bucket = the paper's single all-gather. After
gathering bucket k the buffer is member-major: [member, segment].

Assembly. An inference parameter of generation TP rank j is the concatenation along its partition
dim of the training shards of TP ranks j·r .. j·r+r-1 (`ParamPlan.pieces`, in that order); a
replicated parameter is one piece. Dim-0 parameters whose pieces sit in consecutive members' rows at
equal offsets, back to back, form a `Run`: one `split_with_sizes_copy` moves all of them.

Vocabulary rows: training shards hold a vocabulary padded for t (`ModelConfig.padded_vocab_size`),
the inference model one padded for t_g. Row index = token id in both, so with equal padding the
concatenation is exact; otherwise (t not dividing 128) the block is trimmed (t_g = 1) or realigned
with one extra all-gather over the generation TP group (t_g > 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class ShardMeta:
    """One tensor inside a sender's flat chunk."""

    hf_name: str  # HF checkpoint name (global layer index)
    shape: tuple[int, ...]  # shape of this (training) shard
    partition_dim: int | None  # TP split dim; None for replicated tensors
    tp_rank: int  # training TP rank of the sender
    tp: int  # training TP size
    offset: int  # element offset inside the sender's chunk

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Piece:
    """A `ShardMeta` of gather-group member `member`, at `offset` inside that member's segment of `bucket`."""

    member: int
    meta: ShardMeta
    bucket: int
    offset: int


@dataclass(frozen=True)
class ParamPlan:
    """How to build one inference parameter from the gathered buffers."""

    name: str  # local parameter name in the inference model
    shape: tuple[int, ...]  # its shape
    pieces: tuple[Piece, ...]  # concatenation order
    cat_dim: int | None  # partition dim (None: one replicated piece)
    realign: bool = False  # vocab padding differs and t_g > 1: all-gather rows over the gen-TP group first
    keep_rows: tuple[int, int] | None = None  # rows [start, stop) to keep of the (realigned) block


@dataclass
class Run:
    """Dim-0 parameters copied by one split: rows [member, member + rows) x columns [start, stop) of a bucket."""

    bucket: int
    member: int
    rows: int
    start: int
    stop: int
    plans: list[ParamPlan] = field(default_factory=list)


def partition_dim(param: torch.Tensor) -> int | None:
    """Megatron's TP split dim of a parameter, or None if it is replicated."""
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def send_order(tensors: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    """Chunk order: TP tensors by decreasing size (dim-0 before dim-1 at equal size, model order
    within), then replicated tensors. Stages of a micro-DP group hold similar size sequences, so
    size order lines their buckets up (little padding) and keeps same-shape dim-0 tensors adjacent
    (long fused copies); the r TP ranks of a stage send identical TP lists (equal offsets)."""
    def key(item):
        index, (_, param) = item
        dim = partition_dim(param)
        return (dim is None, -param.numel(), dim or 0, index)
    return [item for _, item in sorted(enumerate(tensors), key=key)]


def chunk_metas(tensors: list[tuple[str, torch.Tensor]], tp_rank: int, tp: int) -> list[ShardMeta]:
    """Metadata of `tensors` [(hf_name, param)] packed back to back in this order into one chunk."""
    metas, offset = [], 0
    for hf_name, param in tensors:
        metas.append(ShardMeta(hf_name, tuple(param.shape), partition_dim(param), tp_rank, tp, offset))
        offset += param.numel()
    return metas


def bucketize(member_metas: list[list[ShardMeta]], bucket_elems: int | None) -> tuple[list[list[Piece]], list[int]]:
    """Place every member's tensors, in chunk order, into buckets of about `bucket_elems` elements
    (a bucket closes before the tensor that would overflow it; a larger tensor gets its own bucket;
    None: one bucket).

    Returns (pieces[member] aligned with member_metas[member], segment size of each bucket in
    elements: the max over members).
    """
    pieces: list[list[Piece]] = []
    sizes: list[int] = []
    for member, metas in enumerate(member_metas):
        mine, bucket, fill = [], 0, 0
        for meta in metas:
            if bucket_elems is not None and fill and fill + meta.numel > bucket_elems:
                bucket, fill = bucket + 1, 0
            mine.append(Piece(member, meta, bucket, fill))
            fill += meta.numel
            if bucket == len(sizes):
                sizes.append(0)
            sizes[bucket] = max(sizes[bucket], fill)
        pieces.append(mine)
    return pieces, sizes


def plan_params(model: nn.Module, member_pieces: list[list[Piece]]) -> list[ParamPlan]:
    """Plan every parameter of inference `model` (a DecoderModel on the generation TP group) from
    the members' pieces (one list per gather-group member, in member order).

    Uses the first member holding a needed shard. Raises AssertionError if a shard is missing
    (the sender rule and the grouping guarantee it is not).
    """
    index: dict[tuple[str, int | None], Piece] = {}
    tp_of: dict[str, int] = {}
    for pieces in member_pieces:
        for piece in pieces:
            meta = piece.meta
            index.setdefault((meta.hf_name, meta.tp_rank if meta.partition_dim is not None else None), piece)
            tp_of[meta.hf_name] = meta.tp
    t_g, j = model.tp, model.tp_rank
    plans = []
    for name, param in model.named_parameters():
        hf = model.hf_name(name)
        dim = partition_dim(param)
        if dim is None:
            assert (hf, None) in index, f"no rank sends replicated {hf}"
            plans.append(ParamPlan(name, tuple(param.shape), (index[(hf, None)],), None))
            continue
        assert hf in tp_of, f"no rank sends {hf}"
        t = tp_of[hf]
        assert t % t_g == 0, f"training tp {t} is not a multiple of tp_g {t_g}"
        r = t // t_g
        pieces = tuple(index[(hf, k)] for k in range(j * r, (j + 1) * r))
        plan = ParamPlan(name, tuple(param.shape), pieces, dim)
        if model.is_vocab_param(name):
            plan = _vocab_plan(plan, rows_per_shard=pieces[0].meta.shape[0], t=t, t_g=t_g, j=j,
                               padded_g=model.padded_vocab_size)
        plans.append(plan)
    return plans


def _vocab_plan(plan: ParamPlan, *, rows_per_shard: int, t: int, t_g: int, j: int, padded_g: int) -> ParamPlan:
    """Add the row fix-up for a vocab-sharded parameter whose padding differs between t and t_g."""
    padded_t = rows_per_shard * t
    if padded_t == padded_g:
        return plan
    assert padded_t > padded_g, "a multiple of lcm(128, t) is a multiple of lcm(128, t_g) when t_g | t"
    if t_g == 1:  # the assembled block is the whole padded_t table; drop the extra padding rows
        return ParamPlan(plan.name, plan.shape, plan.pieces, plan.cat_dim, keep_rows=(0, padded_g))
    rows_g = padded_g // t_g
    return ParamPlan(plan.name, plan.shape, plan.pieces, plan.cat_dim, realign=True,
                     keep_rows=(j * rows_g, (j + 1) * rows_g))


def fused_runs(plans: list[ParamPlan]) -> tuple[list[Run], list[ParamPlan]]:
    """Split `plans` into runs of back-to-back dim-0 parameters (one copy each) and the rest."""
    runs: dict[tuple[int, int, int], list[Run]] = {}
    rest = []
    for plan in plans:
        first = plan.pieces[0]
        fusable = (len(plan.pieces) > 1 and plan.cat_dim == 0 and not plan.realign and plan.keep_rows is None
                   and all(p.member == first.member + i and p.bucket == first.bucket and p.offset == first.offset
                           for i, p in enumerate(plan.pieces)))
        if not fusable:
            rest.append(plan)
            continue
        key = (first.bucket, first.member, len(plan.pieces))
        chain = runs.setdefault(key, [])
        numel = first.meta.numel
        if chain and chain[-1].stop == first.offset:
            chain[-1].stop += numel
            chain[-1].plans.append(plan)
        else:
            chain.append(Run(first.bucket, first.member, len(plan.pieces), first.offset, first.offset + numel, [plan]))
    return [run for chain in runs.values() for run in chain], rest


# ---------------------------------------------------------------------- direct (pack-free) path
SLOT_ALIGN = 64  # elements: every parameter slot of the flat generation shard starts 128-byte aligned (bf16)


@dataclass(frozen=True)
class DirectGather:
    """One TP parameter gathered without packing: every member sends its own training shard of
    `hf_name` (member m holds TP rank j·r + m's shard) and the all-gather output is rank-major.

    `into_param`: dim-0 split, no vocab fix-up: the output IS the parameter (concatenation along
    dim 0). Otherwise the output is a temporary [members, *shard_shape] block re-assembled into
    the parameter afterwards (dim-1 split: one strided copy; vocab rows: trim or realign)."""

    plan: ParamPlan
    hf_name: str
    shard_shape: tuple[int, ...]
    bucket: int
    slot: int  # element offset of the parameter in the flat generation shard

    @property
    def into_param(self) -> bool:
        return self.plan.cat_dim == 0 and not self.plan.realign and self.plan.keep_rows is None

    @property
    def shard_numel(self) -> int:
        return math.prod(self.shard_shape)


def direct_gathers(plans: list[ParamPlan], members: int,
                   bucket_elems: int | None) -> tuple[list[list[DirectGather]], list[ParamPlan], int]:
    """Schedule the direct path for a micro-DP group of `members` ranks that all hold the same stage
    (pp = 1): every TP parameter's pieces are members 0..members-1 in order.

    Order: gathers needing re-assembly first (their copies overlap the later gathers; the last
    bucket then needs no work after its wait), each kind by decreasing size, model order within;
    cut greedily into buckets of about `bucket_elems` elements sent per rank (None: one bucket).
    Returns (gathers of each bucket, replicated plans (reused from the own training tensors),
    elements of the flat generation shard: the TP parameters' slots, `SLOT_ALIGN`-aligned).
    """
    tp_plans, replicated = [], []
    for plan in plans:
        if plan.cat_dim is None:
            replicated.append(plan)
            continue
        assert [p.member for p in plan.pieces] == list(range(members)), f"{plan.name}: not one piece per member"
        assert len({p.meta.hf_name for p in plan.pieces}) == 1 and len({p.meta.shape for p in plan.pieces}) == 1
        assert plan.cat_dim == 0 or len(plan.shape) == 2, f"{plan.name}: dim-1 split of a {len(plan.shape)}-d tensor"
        tp_plans.append(plan)

    def key(item):
        index, plan = item
        direct = plan.cat_dim == 0 and not plan.realign and plan.keep_rows is None
        return (direct, -plan.pieces[0].meta.numel, index)

    buckets: list[list[DirectGather]] = []
    fill, slot = 0, 0
    for _, plan in sorted(enumerate(tp_plans), key=key):
        meta = plan.pieces[0].meta
        if not buckets or (bucket_elems is not None and fill and fill + meta.numel > bucket_elems):
            buckets.append([])
            fill = 0
        buckets[-1].append(DirectGather(plan, meta.hf_name, meta.shape, len(buckets) - 1, slot))
        fill += meta.numel
        slot += -(-math.prod(plan.shape) // SLOT_ALIGN) * SLOT_ALIGN
    return buckets, replicated, slot
