"""Advantage estimators vs verl-style loop references and hand-computed cases (exact up to fp32 rounding).

Runs the torch path and the Triton path (interpreter on CPU, compiled on CUDA). Tolerance 1e-5.
A RuntimeWarning is an error here: the interpreter's numpy warns on a 0 / 0 the kernel computes and then discards.
"""

import numpy as np
import pytest
import torch

from verl_mega.kernels import advantage as A
from verl_mega.kernels.advantage import (
    gae_advantages,
    grpo_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    reference_gae,
    reinforce_pp_baseline_advantages,
    reinforce_pp_returns,
    rloo_advantages,
)

CUDA = torch.cuda.is_available()
IMPL_DEVICES = [("torch", "cpu"), ("triton", "cuda"), ("torch", "cuda")] if CUDA else \
    [("torch", "cpu"), ("triton", "cpu")]
DEVICE = {"torch": "cpu", "triton": "cuda" if CUDA else "cpu"}  # where each impl runs in the hand cases
TOL = dict(atol=1e-5, rtol=1e-5)
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def _ragged(b, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    rewards, values = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = (torch.arange(t)[None] < lengths[:, None]).float()  # contiguous response masks, ragged lengths
    return rewards, values, mask


def test_gae_hand_computed_1x3():
    # gamma = lam = 1: advantage_t = sum_{k>=t} r_k - v_t; the value past the end is 0.
    r, v, m = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, 1.0, 1.5]]), torch.ones(1, 3)
    for impl, dev in DEVICE.items():
        adv, ret = gae_advantages(r.to(dev), v.to(dev), m.to(dev), 1.0, 1.0, impl=impl)
        torch.testing.assert_close(adv.cpu(), torch.tensor([[5.5, 4.0, 1.5]]))
        torch.testing.assert_close(ret.cpu(), torch.tensor([[6.0, 5.0, 3.0]]))
    # The mask ends the sequence: masked tokens get 0 and do not propagate.
    adv, _ = gae_advantages(r, v, torch.tensor([[1.0, 1.0, 0.0]]), 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[2.5, 1.0, 0.0]]))


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_gae_and_returns_match_reference_loops(impl, device):
    r, v, m = _ragged(6, 53)
    m[0, 10:14] = 0  # an interior hole (multi-turn observation tokens): skipped as in verl
    r, v, m = r.to(device), v.to(device), m.to(device)
    adv_ref, ret_ref = reference_gae(r, v, m, 0.97, 0.9)
    adv, ret = gae_advantages(r, v, m.bool(), 0.97, 0.9, impl=impl)
    torch.testing.assert_close(adv, adv_ref, **TOL)
    torch.testing.assert_close(ret, ret_ref, **TOL)
    assert (adv[m == 0] == 0).all()
    disc = A.reference_discounted_returns(r, m, 0.9)
    out = reinforce_pp_returns(r, m, 0.9, whiten=False, impl=impl)
    torch.testing.assert_close(out, disc * m, **TOL)
    torch.testing.assert_close(reinforce_pp_returns(r, m, 0.9, impl=impl), masked_whiten(disc, m) * m, **TOL)
    if impl == "triton":  # several time tiles: the carry between tiles
        from verl_mega.kernels import advantage_triton
        adv16, ret16 = advantage_triton.gae(r, v, m, 0.97, 0.9, block_t=16)
        torch.testing.assert_close(adv16, adv_ref, **TOL)
        torch.testing.assert_close(advantage_triton.discounted_returns(r, m, 0.9, block_t=16), disc, **TOL)


def test_grpo_rloo_hand_computed_group():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0])  # mean 0.5, unbiased std sqrt(1/3)
    std = (1 / 3) ** 0.5
    for impl, dev in DEVICE.items():
        s = scores.to(dev)
        torch.testing.assert_close(grpo_advantages(s, 4, impl=impl).cpu(),
                                   torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-6))
        torch.testing.assert_close(grpo_advantages(s, group_size=4, norm_by_std=False, impl=impl).cpu(),
                                   torch.tensor([0.5, -0.5, -0.5, 0.5]))
        # RLOO: r_i - mean(others) = [1 - 1/3, -2/3, -2/3, 1 - 1/3]
        torch.testing.assert_close(rloo_advantages(s, 4, impl=impl).cpu(), torch.tensor([2, -2, -2, 2]) / 3)
    # Arbitrary ids (strings as in verl's uid arrays), groups of unequal size, one lone sample.
    ids = np.array(["b", "a", "b", "c", "a", "b"])
    x = torch.tensor([1.0, 2.0, 3.0, 7.0, 4.0, 5.0])
    torch.testing.assert_close(grpo_advantages(x, ids, eps=0.0),
                               torch.tensor([-1.0, -2 ** -0.5, 0.0, 7.0, 2 ** -0.5, 1.0]))
    torch.testing.assert_close(rloo_advantages(x, group_index=ids), torch.tensor([-3.0, -2.0, 0.0, 0.0, 2.0, 3.0]))


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@pytest.mark.parametrize("group_size", [1, 5, 16])
def test_group_transforms_match_reference(impl, device, group_size):
    g = torch.Generator().manual_seed(group_size)
    scores = torch.randn(8 * group_size, generator=g).to(device)
    contiguous = torch.arange(scores.numel()) // group_size
    shuffled = (torch.randperm(scores.numel(), generator=g) % 8) * 3 + 100  # any order, any id values
    for mode in (A._GRPO, A._GRPO_NO_STD, A._RLOO, A._CENTER):
        fast = A._group_transform(scores, group_size, mode, 1e-6, impl)
        torch.testing.assert_close(fast, A.reference_group_advantages(scores, contiguous, mode, 1e-6), **TOL)
        by_id = A._group_transform(scores, shuffled.to(device), mode, 1e-6, impl)
        torch.testing.assert_close(by_id, A.reference_group_advantages(scores, shuffled, mode, 1e-6), **TOL)


EQUAL_SCORES = [0.7, 0.1, 0.3, 1 / 3, -2.5, 1e-3, 123.456, 0.0, 1.0]  # 0.7 x 8 gave 0.0596 with sum / n


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_groups_of_equal_scores_get_exactly_zero(impl, device):
    # every value x group size 2..64 (one batch of 9 groups per size), eps 1e-6 and 0, contiguous groups
    # (torch or Triton) and shuffled ids (the scatter path); all four transforms on a few sizes, GRPO on all
    # (the Triton interpreter costs ~0.1 s a call)
    values = torch.tensor(EQUAL_SCORES)
    for size in range(2, 65):
        scores = values.repeat_interleave(size).to(device)  # [9 * size], group g = EQUAL_SCORES[g] x size
        perm = torch.randperm(scores.numel(), generator=torch.Generator().manual_seed(size))
        modes = (A._GRPO, A._GRPO_NO_STD, A._RLOO, A._CENTER) if size in (2, 3, 8, 64) else (A._GRPO,)
        for mode in modes:
            for eps in (1e-6, 0.0):
                outs = [A._group_transform(scores, size, mode, eps, impl)]
                if impl == "torch":  # ids always take the torch scatter path
                    outs.append(A._group_transform(scores[perm], (perm // size).to(device), mode, eps, impl))
                for out in outs:
                    assert torch.equal(out, torch.zeros_like(out)), (size, mode, eps, out.abs().max())


def test_equal_group_beside_a_spread_group():
    # the equal group is 0 while its neighbour keeps the usual GRPO values (eps 0: no inf / NaN anywhere)
    scores = torch.tensor([0.7] * 4 + [1.0, 0.0, 0.0, 1.0])
    want = torch.tensor([0.0] * 4 + [0.5, -0.5, -0.5, 0.5]) / (1 / 3) ** 0.5
    for impl, dev in DEVICE.items():
        torch.testing.assert_close(grpo_advantages(scores.to(dev), 4, eps=0.0, impl=impl).cpu(), want)
        ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], device=dev)
        torch.testing.assert_close(grpo_advantages(scores.to(dev), group_index=ids, eps=0.0, impl=impl).cpu(), want)


def test_reinforce_pp_baseline_matches_verl_formula():
    scores = torch.tensor([1.0, 0.0, 2.0, 4.0, 3.0])
    ids = torch.tensor([0, 0, 1, 1, 2])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    centred = torch.tensor([0.5, -0.5, -1.0, 1.0, 3.0])  # lone sample keeps its score (verl)
    expect = masked_whiten(centred[:, None] * mask, mask) * mask
    for impl, dev in DEVICE.items():
        out = reinforce_pp_baseline_advantages(scores.to(dev), ids.to(dev), mask.to(dev), impl=impl)
        torch.testing.assert_close(out.cpu(), expect)
    torch.testing.assert_close(reinforce_pp_baseline_advantages(scores[:4], group_size=2, mask=mask[:4]),
                               masked_whiten(centred[:4, None] * mask[:4], mask[:4]) * mask[:4])


def test_masked_statistics():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    torch.testing.assert_close(masked_mean(x, m), torch.tensor(2.0))
    torch.testing.assert_close(masked_mean(x, m, dim=1), torch.tensor([2.0]))
    torch.testing.assert_close(masked_var(x, m), torch.tensor(1.0))
    torch.testing.assert_close(masked_var(x, m, unbiased=False), torch.tensor(2 / 3))
    w = masked_whiten(x, m)
    torch.testing.assert_close(w[0, :3], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(masked_whiten(x, m, shift_mean=False)[0, :3], torch.tensor([1.0, 2.0, 3.0]), atol=1e-6,
                               rtol=0)
    x_nan = x.clone()
    x_nan[0, 3] = float("nan")  # values under mask 0 never leak in
    torch.testing.assert_close(masked_mean(x_nan, m), torch.tensor(2.0))
    with pytest.raises(ValueError, match="one element"):
        masked_var(x, torch.tensor([[1.0, 0, 0, 0]]))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="divide the batch"):
        grpo_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="exactly one"):
        grpo_advantages(torch.zeros(6), 2, group_size=2)
    with pytest.raises(ValueError, match="one \\[B, T\\] shape"):
        gae_advantages(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 1.0, 1.0)
    with pytest.raises(ValueError, match="impl must be"):
        rloo_advantages(torch.zeros(4), 2, impl="fast")
