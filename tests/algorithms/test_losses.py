"""PPO losses against hand-computed 1x3 cases (numbers written out), aggregation modes, value loss."""

import math

import pytest
import torch

from verl_mega.algorithms.losses import aggregate_loss, entropy_bonus, policy_loss, value_loss

TOL = dict(rel=1e-5, abs=1e-6)


def ppo_case(ratios, adv):
    logprob = torch.tensor([[math.log(r) for r in ratios]], requires_grad=True)
    return logprob, torch.zeros(1, len(ratios)), torch.tensor([adv]), torch.ones(1, len(ratios))


def test_ppo_clipped_token():
    # ratios r = [1.5, 1.0, 0.6], A = [1, -1, 1], eps = 0.2:
    # t0: max(-1.5, -1.2) = -1.2 (clipped); t1: max(1, 1) = 1; t2: max(-0.6, -0.8) = -0.6
    logprob, old, adv, mask = ppo_case([1.5, 1.0, 0.6], [1.0, -1.0, 1.0])
    loss, stats = policy_loss(logprob, old, adv, mask)
    assert loss.item() == pytest.approx((-1.2 + 1.0 - 0.6) / 3, **TOL)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3, **TOL)
    # k1 = mean(-log r) = -(log 1.5 + log 0.6)/3 ; k3 = mean(r - 1 - log r)
    assert stats["approx_kl"].item() == pytest.approx(-(math.log(1.5) + math.log(0.6)) / 3, **TOL)
    assert stats["approx_kl_k3"].item() == pytest.approx((0.5 - math.log(1.5) + (-0.4 - math.log(0.6))) / 3, **TOL)
    assert stats["dual_clipfrac"].item() == 0.0
    # d/dlogp: clipped token has no gradient; else -A r / 3
    loss.backward()
    assert torch.allclose(logprob.grad, torch.tensor([[0.0, 1.0 / 3, -0.6 / 3]]), atol=1e-6)


def test_ppo_clip_higher():
    # clip_high = 0.6: r = 1.5 is inside [0.8, 1.6], so t0 contributes -1.5
    logprob, old, adv, mask = ppo_case([1.5, 1.0, 0.6], [1.0, -1.0, 1.0])
    loss, stats = policy_loss(logprob, old, adv, mask, clip_low=0.2, clip_high=0.6)
    assert loss.item() == pytest.approx((-1.5 + 1.0 - 0.6) / 3, **TOL)
    assert stats["clipfrac"].item() == 0.0
    # clip_low = 0.5: r = 0.6 with A = -1 -> max(0.6, 0.8)=0.8 (clipped below at 1 - 0.2 = 0.8 by default)
    logprob, old, adv, mask = ppo_case([0.6], [-1.0])
    assert policy_loss(logprob, old, adv, mask)[0].item() == pytest.approx(0.8, **TOL)
    assert policy_loss(logprob, old, adv, mask, clip_low=0.5)[0].item() == pytest.approx(0.6, **TOL)


def test_dual_clip():
    # r = [5, 2, 5], A = [-1, -1, 1], eps = 0.2, c = 3:
    # PPO: t0 max(5, 1.2) = 5; t1 max(2, 1.2) = 2; t2 max(-5, -1.2) = -1.2
    # dual clip (A < 0 only): t0 min(5, 3) = 3; t1 min(2, 3) = 2
    logprob, old, adv, mask = ppo_case([5.0, 2.0, 5.0], [-1.0, -1.0, 1.0])
    plain, _ = policy_loss(logprob, old, adv, mask)
    assert plain.item() == pytest.approx((5 + 2 - 1.2) / 3, **TOL)
    loss, stats = policy_loss(logprob, old, adv, mask, dual_clip=3.0)
    assert loss.item() == pytest.approx((3 + 2 - 1.2) / 3, **TOL)
    assert stats["dual_clipfrac"].item() == pytest.approx(1 / 3, **TOL)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3, **TOL)  # t2
    loss.backward()  # t0 is a constant (-A c), t2 clipped: only t1 has gradient -A r / 3
    assert torch.allclose(logprob.grad, torch.tensor([[0.0, 2.0 / 3, 0.0]]), atol=1e-6)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss(logprob, old, adv, mask, dual_clip=0.5)


def test_aggregation_modes():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])  # third sequence empty
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(7 / 3)  # (1+2+4)/3
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx(3.5)  # (3+4)/2
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx(2.75)  # (1.5+4)/2
    assert aggregate_loss(loss, mask, "token-mean", denominator=10).item() == pytest.approx(0.7)
    assert aggregate_loss(loss, torch.zeros_like(mask), "token-mean").item() == 0.0
    # micro-batches with the global denominator sum to the full-batch loss
    parts = sum(aggregate_loss(loss[i : i + 1], mask[i : i + 1], "token-mean", denominator=3) for i in range(3))
    assert parts.item() == pytest.approx(7 / 3)
    # PPO loss with a padded token: the padding is ignored, agg mode changes the weighting
    logprob, old, adv, _ = ppo_case([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])
    m = torch.tensor([[1.0, 1.0, 0.0]])
    assert policy_loss(logprob, old, adv, m)[0].item() == pytest.approx(-1.5)
    assert policy_loss(logprob, old, adv, m, agg="seq-mean-token-sum")[0].item() == pytest.approx(-3.0)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(loss, mask, "sum")


def test_value_loss():
    # t0: (1-2)^2 = 1 vs clipped v = 0 + 0.2 -> (0.2-2)^2 = 3.24 -> 3.24 (clipped larger)
    # t1: 1 vs 1 -> 1 ; t2: (3-0)^2 = 9 vs v = 2.9+0.1 = 3.0 -> 9
    values = torch.tensor([[1.0, 0.0, 3.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 2.9]])
    returns = torch.tensor([[2.0, 1.0, 0.0]])
    mask = torch.ones(1, 3)
    loss, clipfrac = value_loss(values, old, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1 + 9) / 3, **TOL)
    assert clipfrac.item() == pytest.approx(1 / 3, **TOL)
    loss.backward()  # t0 clipped: no gradient; t1: (v - R)/3 = -1/3; t2: (3 - 0)/3 = 1
    assert torch.allclose(values.grad, torch.tensor([[0.0, -1 / 3, 1.0]]), atol=1e-6)
    unclipped, _ = value_loss(values, old, returns, mask, clip=None)
    assert unclipped.item() == pytest.approx(0.5 * 11 / 3, **TOL)


def test_entropy_bonus():
    ent = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[1, 0], [1, 1]])
    assert entropy_bonus(ent, mask).item() == pytest.approx(8 / 3)
    assert entropy_bonus(ent, mask, "seq-mean-token-mean").item() == pytest.approx((1 + 3.5) / 2)
