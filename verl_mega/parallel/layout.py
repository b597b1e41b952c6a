"""Process-group layout: tensor (tp), pipeline (pp) and data (dp) parallel groups.

Ranks are ordered as in Megatron-LM: tp varies fastest, then dp, then pp, i.e.

    global_rank = ranks[pp_rank * (dp * tp) + dp_rank * tp + tp_rank]

A `Layout` is an explicit object passed to whatever needs groups; there is no module-global
parallel state, so several layouts (training and inference) can coexist over the same ranks.
Building a layout is collective: every rank of the world must construct the same layouts in
the same order (torch.distributed.new_group's contract).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import torch.distributed as dist

from verl_mega.parallel.dist import init_distributed, new_groups


def layout_group_ranks(tp: int, pp: int, dp: int, ranks: Sequence[int] | None = None) -> dict[str, list[list[int]]]:
    """Rank lists of every tp / pp / dp group for a (tp, pp, dp) layout in Megatron order.

    Pure function (no communication): `ranks` are the global ranks the layout covers
    (default range(tp*pp*dp)). Returns {"tp": [...], "pp": [...], "dp": [...], "mp": [...]} where
    "mp" is the model-parallel (tp x pp) group of each data-parallel replica.
    """
    _check_sizes(tp, pp, dp, len(ranks) if ranks is not None else tp * pp * dp)
    ranks = list(ranks) if ranks is not None else list(range(tp * pp * dp))

    def at(p: int, d: int, t: int) -> int:
        return ranks[p * dp * tp + d * tp + t]

    return {
        "tp": [[at(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[at(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": [[at(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)],
        "mp": [[at(p, d, t) for p in range(pp) for t in range(tp)] for d in range(dp)],
    }


def _check_sizes(tp: int, pp: int, dp: int, world_size: int) -> None:
    for name, size in (("tensor_parallel_size", tp), ("pipeline_parallel_size", pp), ("data_parallel_size", dp)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive integer, got {size!r}")
    if tp * pp * dp != world_size:
        raise ValueError(
            f"layout tp={tp} x pp={pp} x dp={dp} = {tp * pp * dp} does not match the world size {world_size}; "
            f"choose sizes whose product is {world_size}"
        )


@dataclass
class Layout:
    """This rank's view of a (tp, pp, dp) layout: its coordinates and its process groups.

    Build with `Layout.create(tp, pp, dp)` (collective). `dp=None` means "whatever is left".
    """

    tp: int
    pp: int
    dp: int
    rank: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    dp_group: dist.ProcessGroup
    mp_group: dist.ProcessGroup
    pp_ranks: list[int] = field(default_factory=list)  # global ranks of this rank's pipeline, stage order
    tp_ranks: list[int] = field(default_factory=list)
    dp_ranks: list[int] = field(default_factory=list)

    @classmethod
    def create(cls, tp: int = 1, pp: int = 1, dp: int | None = None, timeout_s: float | None = None) -> "Layout":
        """Create all groups of a (tp, pp, dp) layout over the world; initialises torch.distributed
        (single process without torchrun is world size 1) if needed. Raises ValueError on bad sizes."""
        init_distributed(timeout_s=timeout_s)
        world = dist.get_world_size()
        if dp is None:
            if not isinstance(tp, int) or not isinstance(pp, int) or tp < 1 or pp < 1:
                raise ValueError(f"tp and pp must be positive integers, got tp={tp!r}, pp={pp!r}")
            if world % (tp * pp):
                raise ValueError(f"world size {world} is not divisible by tp={tp} x pp={pp}: start a multiple of "
                                 f"tp x pp processes, e.g. `torchrun --nproc-per-node {tp * pp} your_script.py`"
                                 + (" (this process was not started by torchrun)" if "RANK" not in os.environ else ""))
            dp = world // (tp * pp)
        groups = layout_group_ranks(tp, pp, dp, range(world))
        me = dist.get_rank()
        mine = new_groups({axis: groups[axis] for axis in ("tp", "dp", "pp", "mp")}, me, timeout_s)
        pp_rank, rest = divmod(me, dp * tp)
        dp_rank, tp_rank = divmod(rest, tp)
        return cls(
            tp=tp, pp=pp, dp=dp, rank=me, tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank,
            tp_group=mine["tp"][0], pp_group=mine["pp"][0], dp_group=mine["dp"][0], mp_group=mine["mp"][0],
            pp_ranks=mine["pp"][1], tp_ranks=mine["tp"][1], dp_ranks=mine["dp"][1],
        )

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def prev_stage_rank(self) -> int | None:
        """Global rank of the previous pipeline stage (None on the first stage)."""
        return None if self.is_first_stage else self.pp_ranks[self.pp_rank - 1]

    @property
    def next_stage_rank(self) -> int | None:
        """Global rank of the next pipeline stage (None on the last stage)."""
        return None if self.is_last_stage else self.pp_ranks[self.pp_rank + 1]

    @property
    def last_stage_rank(self) -> int:
        return self.pp_ranks[-1]

    @property
    def first_stage_rank(self) -> int:
        return self.pp_ranks[0]

    def __repr__(self) -> str:
        return (f"Layout(tp={self.tp}, pp={self.pp}, dp={self.dp}; rank {self.rank} at "
                f"tp={self.tp_rank}, pp={self.pp_rank}, dp={self.dp_rank})")
