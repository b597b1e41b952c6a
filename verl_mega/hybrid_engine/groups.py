"""Inference (generation) process groups derived from a training layout, HybridFlow-style.

Reference: HybridFlow (Sheng et al., EuroSys 2025), §5 "3D-HybridEngine" and Table 2.

Training uses a (t, p, d) = (tp, pp, dp) layout in Megatron rank order (tp fastest, then dp, then
pp; `verl_mega.parallel.layout`). Generation reuses the same ranks with a smaller model-parallel
size (t_g, p_g), t_g | t and p_g | p. Inside every training model-parallel group (the p·t ranks of one
training DP replica) there are

    d_g = (p·t) / (p_g·t_g)   "micro-DP" replicas of the generation model.

Grouping (the zero-redundancy one of the paper): with r_t = t/t_g and r_p = p/p_g,

- a rank at training coordinates (p_rank, t_rank) gets generation coordinates
  tp_g_rank = t_rank // r_t and pp_g_rank = p_rank // r_p, so its generation shard (a block of
  r_t consecutive training TP shards, of r_p consecutive pipeline stages) CONTAINS its training shard;
- micro-DP group = the d_g ranks with the same generation coordinates: consecutive training TP
  ranks (and consecutive stages). Their training shards tile one generation shard exactly, so one
  all-gather inside the micro-DP group gives every member its generation shard;
- micro-DP rank = (p_rank % r_p) · r_t + (t_rank % r_t);
- generation TP group = ranks with equal micro-DP rank and pp_g_rank, varying tp_g_rank: training TP
  ranks at stride r_t; generation PP group likewise at stride r_p in the stages;
- generation DP group ("dp_g") = all ranks holding the same generation shard over the whole world
  (the micro-DP group of each of the d training replicas), size d·d_g, ordered (dp_rank, micro rank);
  prompts are split over it.

Worked example (tp=4, pp=1, dp=1, tp_g=2): r_t = 2, d_g = 2.

    rank (t_rank):        0    1    2    3
    tp_g_rank:            0    0    1    1
    micro-DP rank:        0    1    0    1
    micro-DP groups: {0,1} {2,3}     (consecutive; {0,1} holds columns 0..1/4 + 1..2/4 = gen shard 0)
    gen-TP groups:   {0,2} {1,3}     (stride 2)

With (tp=2, pp=2, tp_g=1) all four ranks form one micro-DP group and every rank ends up holding the
whole model; with (tp=2, pp=2, tp_g=2) the micro-DP groups are the training pipelines {0,2} {1,3}
(a pure pp→1 gather, the TP part is a no-op) and the gen-TP groups are the stages {0,1} {2,3}.

Simplification: the layout covers the whole world (ranks 0..world-1), like `Layout.create`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist

from verl_mega.parallel.dist import new_groups
from verl_mega.parallel.layout import Layout, layout_group_ranks


def check_inference_sizes(tp: int, pp: int, tp_g: int, pp_g: int = 1) -> None:
    """Raise ValueError unless tp_g divides tp and pp_g divides pp (positive integers)."""
    for name, size in (("tp_g", tp_g), ("pp_g", pp_g)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{name} must be a positive integer, got {size!r}")
    if tp % tp_g:
        raise ValueError(f"inference tensor-parallel size tp_g={tp_g} must divide the training tp={tp} "
                         f"(the generation shard must contain whole training shards); choose one of "
                         f"{[s for s in range(1, tp + 1) if tp % s == 0]}")
    if pp % pp_g:
        raise ValueError(f"inference pipeline size pp_g={pp_g} must divide the training pp={pp}")


def inference_coords(tp: int, pp: int, dp: int, tp_g: int, pp_g: int, rank: int) -> dict[str, int]:
    """Generation coordinates of global `rank`: {"tp_g", "pp_g", "micro_dp", "dp_g", "dp"} ranks."""
    check_inference_sizes(tp, pp, tp_g, pp_g)
    p, rest = divmod(rank, dp * tp)
    d, t = divmod(rest, tp)
    r_t, r_p = tp // tp_g, pp // pp_g
    micro = (p % r_p) * r_t + t % r_t
    d_g = r_t * r_p
    return {"tp_g": t // r_t, "pp_g": p // r_p, "micro_dp": micro, "dp_g": d * d_g + micro, "dp": d}


def inference_group_ranks(tp: int, pp: int, dp: int, tp_g: int, pp_g: int = 1) -> dict[str, list[list[int]]]:
    """Rank lists of every generation group for training layout (tp, pp, dp) → (tp_g, pp_g).

    Pure function (no communication). Returns {"tp_g": [...], "pp_g": [...], "micro_dp": [...],
    "dp_g": [...]}, each a list of groups, each group a list of global ranks in group-rank order.
    See the module docstring for the rule and a worked example. Raises ValueError if tp_g does not
    divide tp or pp_g does not divide pp.
    """
    check_inference_sizes(tp, pp, tp_g, pp_g)
    layout_group_ranks(tp, pp, dp)  # validates tp, pp, dp

    def at(p: int, d: int, t: int) -> int:  # Megatron order, as in layout_group_ranks
        return p * dp * tp + d * tp + t

    r_t, r_p = tp // tp_g, pp // pp_g
    micro_offsets = [(mp, mt) for mp in range(r_p) for mt in range(r_t)]  # index = micro-DP rank
    groups: dict[str, list[list[int]]] = {"tp_g": [], "pp_g": [], "micro_dp": [], "dp_g": []}
    for d in range(dp):
        for pg in range(pp_g):
            for tg in range(tp_g):
                groups["micro_dp"].append([at(pg * r_p + mp, d, tg * r_t + mt) for mp, mt in micro_offsets])
            for mp, mt in micro_offsets:
                groups["tp_g"].append([at(pg * r_p + mp, d, j * r_t + mt) for j in range(tp_g)])
        for tg in range(tp_g):
            for mp, mt in micro_offsets:
                groups["pp_g"].append([at(q * r_p + mp, d, tg * r_t + mt) for q in range(pp_g)])
    for pg in range(pp_g):
        for tg in range(tp_g):
            groups["dp_g"].append([at(pg * r_p + mp, d, tg * r_t + mt) for d in range(dp) for mp, mt in micro_offsets])
    return groups


@dataclass
class InferenceLayout:
    """This rank's view of the generation layout: sizes, coordinates and process groups.

    Build with `InferenceLayout.create(train_layout, tp_g)` (collective: every rank of the world
    calls it in the same order). `micro_dp` is d_g, `dp_g` the total generation DP size d·d_g.
    """

    tp_g: int
    pp_g: int
    micro_dp: int
    dp_g: int
    rank: int
    tp_g_rank: int
    pp_g_rank: int
    micro_dp_rank: int
    dp_g_rank: int
    tp_g_group: dist.ProcessGroup
    pp_g_group: dist.ProcessGroup
    micro_dp_group: dist.ProcessGroup
    dp_g_group: dist.ProcessGroup
    train: Layout
    tp_g_ranks: list[int] = field(default_factory=list)
    pp_g_ranks: list[int] = field(default_factory=list)
    micro_dp_ranks: list[int] = field(default_factory=list)
    dp_g_ranks: list[int] = field(default_factory=list)

    @classmethod
    def create(cls, train: Layout, tp_g: int, pp_g: int = 1, timeout_s: float | None = None) -> "InferenceLayout":
        """Create the generation groups of `train` → (tp_g, pp_g) over the world (collective)."""
        groups = inference_group_ranks(train.tp, train.pp, train.dp, tp_g, pp_g)
        me = train.rank
        mine = new_groups({axis: groups[axis] for axis in ("tp_g", "pp_g", "micro_dp", "dp_g")}, me, timeout_s)
        coords = inference_coords(train.tp, train.pp, train.dp, tp_g, pp_g, me)
        d_g = (train.tp * train.pp) // (tp_g * pp_g)
        return cls(
            tp_g=tp_g, pp_g=pp_g, micro_dp=d_g, dp_g=d_g * train.dp, rank=me,
            tp_g_rank=coords["tp_g"], pp_g_rank=coords["pp_g"], micro_dp_rank=coords["micro_dp"],
            dp_g_rank=coords["dp_g"], tp_g_group=mine["tp_g"][0], pp_g_group=mine["pp_g"][0],
            micro_dp_group=mine["micro_dp"][0], dp_g_group=mine["dp_g"][0], train=train,
            tp_g_ranks=mine["tp_g"][1], pp_g_ranks=mine["pp_g"][1], micro_dp_ranks=mine["micro_dp"][1],
            dp_g_ranks=mine["dp_g"][1],
        )

    def __repr__(self) -> str:
        return (f"InferenceLayout(tp_g={self.tp_g}, pp_g={self.pp_g}, micro_dp={self.micro_dp}, dp_g={self.dp_g}; "
                f"rank {self.rank} at tp_g={self.tp_g_rank}, micro_dp={self.micro_dp_rank}, dp_g={self.dp_g_rank})")
