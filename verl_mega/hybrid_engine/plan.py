"""Resharding plan: what each rank packs into its gather chunk, and where every inference parameter's
pieces lie in the gathered buffer.

Each sender packs the TP shards (and, if it is the designated sender, the replicated tensors) of its
training stage into one flat chunk; `ShardMeta` records name (HF naming, global layer index), shape,
TP coordinates and offset of each. After one all-gather of equal-size chunks (padded to the largest)
the buffer is rank-major: chunk m = member m's tensors. An inference parameter of generation TP rank
j out of t_g is the concatenation, along its partition dim, of the training shards of TP ranks
j·r .. j·r+r-1 (r = t/t_g), in that order; a replicated parameter is one piece.

Vocabulary rows: training shards hold a vocabulary padded for t (`ModelConfig.padded_vocab_size`),
the inference model one padded for t_g. Row index = token id in both, so with equal padding the
concatenation is exact; otherwise (t not dividing 128) the block is trimmed (t_g = 1) or realigned
with one extra all-gather over the generation TP group (t_g > 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    """A `ShardMeta` inside the chunk of gather-group member `member`."""

    member: int
    meta: ShardMeta


@dataclass(frozen=True)
class ParamPlan:
    """How to build one inference parameter from the gathered buffer."""

    name: str  # local parameter name in the inference model
    shape: tuple[int, ...]  # its shape
    pieces: tuple[Piece, ...]  # concatenation order
    cat_dim: int | None  # partition dim (None: one replicated piece)
    realign: bool = False  # vocab padding differs and t_g > 1: all-gather rows over the gen-TP group first
    keep_rows: tuple[int, int] | None = None  # rows [start, stop) to keep of the (realigned) block


def partition_dim(param: torch.Tensor) -> int | None:
    """Megatron's TP split dim of a parameter, or None if it is replicated."""
    return param.partition_dim if getattr(param, "tensor_model_parallel", False) else None


def chunk_metas(tensors: list[tuple[str, torch.Tensor]], tp_rank: int, tp: int) -> list[ShardMeta]:
    """Metadata of `tensors` [(hf_name, param)] packed back to back in this order into one chunk."""
    metas, offset = [], 0
    for hf_name, param in tensors:
        metas.append(ShardMeta(hf_name, tuple(param.shape), partition_dim(param), tp_rank, tp, offset))
        offset += param.numel()
    return metas


def plan_params(model: nn.Module, member_metas: list[list[ShardMeta]]) -> list[ParamPlan]:
    """Plan every parameter of inference `model` (a DecoderModel on the generation TP group) from
    the chunks described by `member_metas` (one list per gather-group member, in member order).

    Uses the first member holding a needed shard. Raises AssertionError if a shard is missing
    (the sender rule and the grouping guarantee it is not).
    """
    index: dict[tuple[str, int | None], Piece] = {}
    for member, metas in enumerate(member_metas):
        for meta in metas:
            key = (meta.hf_name, meta.tp_rank if meta.partition_dim is not None else None)
            index.setdefault(key, Piece(member, meta))
    t_g, j = model.tp, model.tp_rank
    plans = []
    for name, param in model.named_parameters():
        hf = model.hf_name(name)
        dim = partition_dim(param)
        if dim is None:
            assert (hf, None) in index, f"no rank sends replicated {hf}"
            plans.append(ParamPlan(name, tuple(param.shape), (index[(hf, None)],), None))
            continue
        some = next((p for (n, _), p in index.items() if n == hf), None)
        assert some is not None, f"no rank sends {hf}"
        t = some.meta.tp
        assert t % t_g == 0, f"training tp {t} is not a multiple of tp_g {t_g}"
        r = t // t_g
        pieces = tuple(index[(hf, k)] for k in range(j * r, (j + 1) * r))
        plan = ParamPlan(name, tuple(param.shape), pieces, dim)
        if model.is_vocab_param(name):
            plan = _vocab_plan(plan, rows_per_shard=some.meta.shape[0], t=t, t_g=t_g, j=j,
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
