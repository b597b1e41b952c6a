"""Advantage estimators against hand-computed small cases (numbers written out)."""

import math

import pytest
import torch

from verl_mega.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS,
    get_advantage_estimator,
    outcome_to_token_rewards,
)

ATOL = 1e-5


def close(x, expected):
    return torch.allclose(x, torch.tensor(expected, dtype=x.dtype), atol=ATOL)


def outcome(scores, t=2):
    """Outcome scores as token rewards on the last of t valid tokens."""
    mask = torch.ones(len(scores), t)
    return outcome_to_token_rewards(torch.tensor(scores), mask), mask


def test_outcome_to_token_rewards():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    r = outcome_to_token_rewards(torch.tensor([2.0, 3.0, 4.0]), mask)
    assert close(r, [[0.0, 2.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]])


def test_grpo_groups_of_2_and_4():
    grpo = get_advantage_estimator("grpo")
    rewards, mask = outcome([1.0, 0.0, 0.0, 1.0])
    # groups of 2: {1, 0} and {0, 1}: mean 0.5, unbiased std sqrt(0.5) = 0.707107 -> +-0.5/0.707107
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    adv, ret = grpo(rewards, mask, group_size=2)
    assert close(adv, [[a, a], [-a, -a], [-a, -a], [a, a]]) and torch.equal(adv, ret)
    # one group of 4: mean 0.5, unbiased std sqrt(1/3) = 0.577350 -> +-0.866025
    b = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    adv, _ = grpo(rewards, mask, group_size=4)
    assert close(adv[:, 0], [b, -b, -b, b])
    # explicit (non-contiguous) group ids: {0, 3} and {1, 2} -> scores {1, 1} and {0, 0}: all zero
    adv, _ = grpo(rewards, mask, group_index=torch.tensor([0, 1, 1, 0]))
    assert close(adv, [[0.0, 0.0]] * 4)
    # Dr. GRPO (no std normalisation): s - mean
    adv, _ = grpo(rewards, mask, group_size=4, norm_by_std=False)
    assert close(adv[:, 1], [0.5, -0.5, -0.5, 0.5])


def test_rloo():
    rloo = get_advantage_estimator("rloo")
    rewards, mask = outcome([1.0, 0.0, 0.0, 1.0])
    adv, _ = rloo(rewards, mask, group_size=2)  # s_i - (other one)
    assert close(adv[:, 0], [1.0, -1.0, -1.0, 1.0])
    adv, _ = rloo(rewards, mask, group_size=4)  # 1 - 1/3, 0 - 2/3
    assert close(adv[:, 0], [2 / 3, -2 / 3, -2 / 3, 2 / 3])
    rewards, mask = outcome([3.0, 1.0, 2.0])
    adv, ret = rloo(rewards, mask, group_index=torch.tensor([7, 7, 7]))  # 3-1.5, 1-2.5, 2-2
    assert close(adv[:, 1], [1.5, -1.5, 0.0]) and torch.equal(adv, ret)


def test_gae_gamma_lambda_1_and_gamma_half():
    gae = get_advantage_estimator("gae")
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    # gamma = lam = 1: deltas 0.1, 0.1, 0.3 -> A = [0.5, 0.4, 0.3] (= 1 - V), returns = [1, 1, 1]
    adv, ret = gae(rewards, mask, values=values, gamma=1.0, lam=1.0, whiten=False)
    assert close(adv, [[0.5, 0.4, 0.3]]) and close(ret, [[1.0, 1.0, 1.0]])
    # gamma = 0.5, lam = 1: deltas 0.5*0.6-0.5 = -0.2, 0.5*0.7-0.6 = -0.25, 1-0.7 = 0.3
    # A2 = 0.3, A1 = -0.25 + 0.5*0.3 = -0.1, A0 = -0.2 + 0.5*(-0.1) = -0.25; returns = [0.25, 0.5, 1]
    adv, ret = gae(rewards, mask, values=values, gamma=0.5, lam=1.0, whiten=False)
    assert close(adv, [[-0.25, -0.1, 0.3]]) and close(ret, [[0.25, 0.5, 1.0]])
    # whitened over valid tokens: [0.5, 0.4, 0.3] has mean 0.4, unbiased std 0.1 -> [1, 0, -1]
    adv, _ = gae(rewards, mask, values=values, gamma=1.0, lam=1.0)
    assert close(adv, [[1.0, 0.0, -1.0]])
    # padding is skipped: the masked token's reward/value never enters
    adv, ret = gae(torch.tensor([[0.0, 1.0, 5.0]]), torch.tensor([[1.0, 1.0, 0.0]]),
                   values=torch.tensor([[0.5, 0.6, 9.0]]), whiten=False)
    assert close(adv, [[0.5, 0.4, 0.0]]) and close(ret[:, :2], [[1.0, 1.0]])
    with pytest.raises(ValueError, match="values"):
        gae(rewards, mask)


def test_reinforce_plus_plus():
    rpp = get_advantage_estimator("reinforce_plus_plus")
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = rpp(rewards, mask, gamma=1.0)
    assert close(ret, [[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]])
    # whiten {1,1,1,2,2}: mean 1.4, unbiased var (3*0.16 + 2*0.36)/4 = 0.3
    lo, hi = -0.4 / math.sqrt(0.3), 0.6 / math.sqrt(0.3)  # -0.730297, 1.095445
    assert close(adv, [[lo, lo, lo], [hi, hi, 0.0]])
    _, ret = rpp(rewards, mask, gamma=0.5)
    assert close(ret, [[0.25, 0.5, 1.0], [1.0, 2.0, 0.0]])


def test_reinforce_plus_plus_baseline():
    rpb = get_advantage_estimator("reinforce_plus_plus_baseline")
    rewards, mask = outcome([1.0, 0.0, 0.0, 1.0])
    # minus group mean (groups of 2): +-0.5 on 8 tokens; whiten: mean 0, unbiased std sqrt(2/7)
    a = 0.5 / math.sqrt(2 / 7)  # 0.935414
    adv, ret = rpb(rewards, mask, group_size=2)
    assert close(adv, [[a, a], [-a, -a], [-a, -a], [a, a]]) and torch.equal(adv, ret)


def test_groups_of_one_follow_verl():
    # rollout.n_samples=1: GRPO / RLOO are refused by check_config; here the estimators' own conventions
    rewards, mask = outcome([1.0, 0.0, 1.0, 0.0])
    grpo, _ = get_advantage_estimator("grpo")(rewards, mask, group_size=1)
    assert close(grpo, [[1, 1], [0, 0], [1, 1], [0, 0]])  # mean 0, std 1: the raw score
    assert close(get_advantage_estimator("rloo")(rewards, mask, group_size=1)[0], [[0, 0]] * 4)
    # REINFORCE++-baseline: baseline 0 for a group of one, then whitened over the batch (as REINFORCE++)
    a = 0.5 / math.sqrt(2 / 7)
    rpb, _ = get_advantage_estimator("reinforce_plus_plus_baseline")(rewards, mask, group_size=1)
    assert close(rpb, [[a, a], [-a, -a], [a, a], [-a, -a]])


def test_registry_and_shared_call():
    assert set(ADVANTAGE_ESTIMATORS) == {"gae", "grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"}
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'ppo'.*grpo"):
        get_advantage_estimator("ppo")
    rewards, mask = outcome([1.0, 0.0, 0.0, 1.0], t=3)
    mask[0, 2] = 0  # one padded token
    common = dict(values=torch.zeros(4, 3), group_size=2, gamma=1.0, lam=1.0, norm_by_std=True, whiten=True)
    for name, est in ADVANTAGE_ESTIMATORS.items():
        adv, ret = est(rewards, mask, **common)  # every estimator accepts the same call
        assert adv.shape == ret.shape == (4, 3), name
        assert adv[0, 2] == 0 and torch.isfinite(adv).all(), name
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        get_advantage_estimator("grpo")(torch.zeros(4), mask, group_size=2)


def _dp_split_estimators(full_rewards, full_mask, full_values):
    """On each of 2 ranks: its half of the batch, whitened over the dp group (= the whole batch)."""
    from verl_mega.parallel import Layout
    layout = Layout.create(tp=1, pp=1)
    half = full_rewards.shape[0] // 2
    rows = slice(layout.dp_rank * half, (layout.dp_rank + 1) * half)
    out = {}
    for name in ("gae", "reinforce_plus_plus", "reinforce_plus_plus_baseline"):
        adv, _ = get_advantage_estimator(name)(full_rewards[rows], full_mask[rows], values=full_values[rows],
                                               group_size=2, gamma=0.9, lam=0.8, dp_group=layout.dp_group)
        out[name] = adv
    return out


def test_whitening_over_data_parallel_ranks_equals_whole_batch():
    """A batch split over dp=2 ranks is whitened with the whole batch's statistics (single-process numbers)."""
    from verl_mega.testing import run_distributed
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randn(8, 6, generator=gen)
    mask = torch.ones(8, 6)
    mask[1, 4:] = 0
    mask[6, 2:] = 0
    values = torch.randn(8, 6, generator=gen)
    per_rank = run_distributed(_dp_split_estimators, 2, rewards, mask, values)
    for name in ("gae", "reinforce_plus_plus", "reinforce_plus_plus_baseline"):
        whole, _ = get_advantage_estimator(name)(rewards, mask, values=values, group_size=2, gamma=0.9, lam=0.8)
        split = torch.cat([per_rank[0][name], per_rank[1][name]])
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
        # and per-rank whitening would differ: the test has teeth
        local, _ = get_advantage_estimator(name)(rewards[:4], mask[:4], values=values[:4], group_size=2, gamma=0.9, lam=0.8)
        assert (local - whole[:4]).abs().max() > 1e-3
