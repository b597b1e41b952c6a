"""Generation-group membership (pure functions, no processes)."""

from fractions import Fraction

import pytest

from verl_mega.hybrid_engine.groups import inference_coords, inference_group_ranks
from verl_mega.parallel.layout import layout_group_ranks


def test_design_note_example():
    g = inference_group_ranks(tp=4, pp=1, dp=1, tp_g=2)
    assert g["micro_dp"] == [[0, 1], [2, 3]]
    assert g["tp_g"] == [[0, 2], [1, 3]]
    assert g["dp_g"] == [[0, 1], [2, 3]]
    assert g["pp_g"] == [[0], [1], [2], [3]]


def test_tp2_pp2_examples():
    g = inference_group_ranks(tp=2, pp=2, dp=1, tp_g=1)
    assert g["micro_dp"] == [[0, 1, 2, 3]] and g["tp_g"] == [[0], [1], [2], [3]]
    g = inference_group_ranks(tp=2, pp=2, dp=1, tp_g=2)
    assert g["micro_dp"] == [[0, 2], [1, 3]]  # the training pipelines: pure pp -> 1
    assert g["tp_g"] == [[0, 1], [2, 3]]  # each stage's TP group serves generation unchanged


@pytest.mark.parametrize("tp,pp,dp,tp_g,pp_g", [
    (1, 1, 2, 1, 1), (2, 1, 2, 1, 1), (4, 1, 1, 2, 1), (2, 2, 1, 1, 1), (2, 2, 1, 2, 1), (4, 2, 2, 2, 1),
    (8, 1, 1, 4, 1), (2, 4, 2, 1, 1), (4, 4, 1, 2, 2), (2, 2, 2, 2, 2), (6, 1, 1, 3, 1), (6, 2, 1, 2, 1),
])
def test_groups_partition_and_contain_training_shards(tp, pp, dp, tp_g, pp_g):
    world = tp * pp * dp
    g = inference_group_ranks(tp, pp, dp, tp_g, pp_g)
    d_g = tp * pp // (tp_g * pp_g)
    sizes = {"tp_g": tp_g, "pp_g": pp_g, "micro_dp": d_g, "dp_g": d_g * dp}
    for axis, size in sizes.items():  # every axis partitions the world into groups of the right size
        assert sorted(r for grp in g[axis] for r in grp) == list(range(world)), axis
        assert all(len(grp) == size for grp in g[axis]), axis
    mp_of = {r: i for i, grp in enumerate(layout_group_ranks(tp, pp, dp)["mp"]) for r in grp}
    for grp in g["micro_dp"]:
        assert len({mp_of[r] for r in grp}) == 1  # inside one training model-parallel group
        assert grp == sorted(grp)  # consecutive training ranks in rank order
    for rank in range(world):
        c = inference_coords(tp, pp, dp, tp_g, pp_g, rank)
        for axis, key in (("tp_g", "tp_g"), ("pp_g", "pp_g"), ("micro_dp", "micro_dp"), ("dp_g", "dp_g")):
            grp = next(grp for grp in g[axis] if rank in grp)
            assert grp.index(rank) == c[key], (axis, rank)
        # The generation shard (tp slice, stage slice) contains the training shard.
        p, rest = divmod(rank, dp * tp)
        t = rest % tp
        assert Fraction(c["tp_g"], tp_g) <= Fraction(t, tp) and Fraction(t + 1, tp) <= Fraction(c["tp_g"] + 1, tp_g)
        assert Fraction(c["pp_g"], pp_g) <= Fraction(p, pp) and Fraction(p + 1, pp) <= Fraction(c["pp_g"] + 1, pp_g)
    for grp in g["micro_dp"]:  # members' training shards tile the generation shard exactly once
        shards = set()
        for rank in grp:
            p, rest = divmod(rank, dp * tp)
            shards.add((p, rest % tp))
        assert len(shards) == d_g


@pytest.mark.parametrize("tp,pp,tp_g,pp_g", [(4, 1, 3, 1), (2, 1, 4, 1), (2, 2, 1, 3), (2, 1, 0, 1), (2, 1, 1.0, 1)])
def test_bad_inference_sizes_raise(tp, pp, tp_g, pp_g):
    with pytest.raises(ValueError, match="tp_g|pp_g"):
        inference_group_ranks(tp, pp, 1, tp_g, pp_g)
