"""Layout: Megatron rank order, group membership, bad sizes, groups built over gloo."""

import pytest
import torch
import torch.distributed as dist

from verl_mega.parallel import Layout, layout_group_ranks
from verl_mega.testing import run_distributed


def test_megatron_order_world8():
    # Megatron-LM's initialize_model_parallel with tp=2, pp=2 over 8 ranks (dp=2).
    g = layout_group_ranks(tp=2, pp=2, dp=2)
    assert g["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert sorted(g["dp"]) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert sorted(g["pp"]) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert sorted(g["mp"]) == [[0, 1, 4, 5], [2, 3, 6, 7]]


@pytest.mark.parametrize("sizes", [(3, 1, 1), (2, 2, 3), (0, 1, 4)])
def test_bad_sizes_raise(sizes):
    tp, pp, dp = sizes
    with pytest.raises(ValueError, match="tp=|must be a positive"):
        layout_group_ranks(tp, pp, dp, ranks=range(4))


def _layout_coords(tp, pp):
    layout = Layout.create(tp=tp, pp=pp)
    x = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(x, group=layout.tp_group)  # the groups are real and usable
    return (layout.tp_rank, layout.pp_rank, layout.dp_rank, layout.tp_ranks, layout.pp_ranks,
            layout.is_first_stage, layout.is_last_stage, x.item())


def test_layout_groups_over_gloo():
    out = run_distributed(_layout_coords, 4, 2, 2)
    assert [o[:3] for o in out] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
    assert out[0][3] == [0, 1] and out[2][4] == [0, 2]
    assert out[0][5] and not out[0][6] and out[3][6]
    assert [o[7] for o in out] == [1.0, 1.0, 5.0, 5.0]


def _bad_world():
    Layout.create(tp=3, pp=1, dp=1)


def test_bad_world_size_is_clear_error():
    with pytest.raises(RuntimeError, match="does not match the world size 2"):
        run_distributed(_bad_world, 2)


def test_single_process_layout():
    layout = Layout.create(tp=1, pp=1)
    assert layout.world_size == 1 and layout.is_first_stage and layout.is_last_stage


def test_tp_larger_than_a_plain_process_says_how_to_launch(monkeypatch):
    """`get_actor_model(path, tensor_parallel_size=2)` in a plain `python script.py`: the message says to use torchrun."""
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match=r"world size 1 is not divisible by tp=2 x pp=1: .*torchrun --nproc-per-node 2 "
                                         r".*not started by torchrun"):
        Layout.create(tp=2, pp=1)
