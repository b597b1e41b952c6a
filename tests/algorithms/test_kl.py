"""KL estimators, controllers and the in-reward penalty against hand-computed values."""

import math

import pytest
import torch

from verl_mega.algorithms.kl import (
    AdaptiveKLController,
    FixedKLController,
    apply_kl_penalty,
    kl_loss,
    kl_penalty,
)

LOGP = torch.tensor([[-1.0, -2.0]])
REF = torch.tensor([[-1.5, -1.0]])  # logp - ref = [0.5, -1.0]; log r = ref - logp = [-0.5, 1.0]


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("k1", [0.5, -1.0]),
        ("kl", [0.5, -1.0]),
        ("abs", [0.5, 1.0]),
        ("k2", [0.125, 0.5]),
        ("mse", [0.125, 0.5]),
        ("k3", [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1 - 1]),  # [0.106531, 0.718282]
        ("low_var_kl", [0.1065307, 0.7182818]),
    ],
)
def test_kl_kinds(kind, expected):
    assert torch.allclose(kl_penalty(LOGP, REF, kind), torch.tensor([expected]), atol=1e-6)


def test_k3_clamps():
    # log r = -30 -> clamped to -20: e^-20 + 20 - 1 = 19.0 -> clamped to 10; log r = +30 -> huge -> 10
    out = kl_penalty(torch.tensor([0.0, -30.0]), torch.tensor([-30.0, 0.0]), "k3")
    assert out.tolist() == [10.0, 10.0]
    with pytest.raises(ValueError, match="unknown KL estimator 'full'"):
        kl_penalty(LOGP, REF, "full")


def test_apply_kl_penalty():
    scores = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl_mean = apply_kl_penalty(scores, kl, torch.zeros_like(kl), mask, coef=0.5, kind="k1")
    expected = torch.tensor([[-0.05, -0.1, 0.85], [-0.2, 1.75, 0.0]])
    assert torch.allclose(rewards, expected, atol=1e-6)
    assert kl_mean.item() == pytest.approx((0.6 / 3 + 0.9 / 2) / 2)  # per-seq means, then batch mean
    assert kl_loss(kl, torch.zeros_like(kl), mask, kind="k1").item() == pytest.approx(1.5 / 5)


def test_controllers():
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)  # error 0.5 -> clipped 0.2: x (1 + 0.2*256/1e4)
    assert ctl.value == pytest.approx(0.1 * 1.00512)
    ctl.update(current_kl=3.0, n_steps=256)  # error -0.5 -> -0.2
    assert ctl.value == pytest.approx(0.1 * 1.00512 * 0.99488)
    ctl.update(current_kl=6.6, n_steps=100)  # error 0.1
    assert ctl.value == pytest.approx(0.1 * 1.00512 * 0.99488 * 1.001)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, 0.0, 10)
