"""Sampling: greedy, temperature, top-k, top-p, seeding, log-probs (plain-torch references)."""

import pytest
import torch

from verl_mega.rollout.sampling import SamplingParams, sample_tokens, truncate_logits


def _logits(b=6, v=50, seed=0):
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_with_untempered_logprobs():
    logits = _logits()
    tok, lp = sample_tokens(logits, SamplingParams(temperature=0.0))
    assert torch.equal(tok, logits.argmax(-1))
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0], rtol=0, atol=0)


def test_top_k_1_equals_greedy_and_logprobs_are_untruncated():
    logits = _logits()
    for seed in range(3):
        tok, lp = sample_tokens(logits, SamplingParams(temperature=0.7, top_k=1), torch.Generator().manual_seed(seed))
        assert torch.equal(tok, logits.argmax(-1))
        ref = torch.log_softmax(logits / 0.7, -1).gather(-1, tok[:, None])[:, 0]
        torch.testing.assert_close(lp, ref, rtol=0, atol=1e-6)


def test_seeded_sampling_is_reproducible():
    logits = _logits(b=32)
    p = SamplingParams(temperature=1.0, top_p=0.9, top_k=20)
    a = sample_tokens(logits, p, torch.Generator().manual_seed(7))
    b = sample_tokens(logits, p, torch.Generator().manual_seed(7))
    c = sample_tokens(logits, p, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_top_p_and_top_k_sets_match_hand_computed():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda k, p: torch.isfinite(truncate_logits(logits, k, p))[0].nonzero()[:, 0].tolist()  # noqa: E731
    assert kept(0, 0.5) == [1]
    assert kept(0, 0.7) == [1, 3]
    assert kept(0, 0.81) == [1, 2, 3]
    assert kept(2, 1.0) == [1, 3]
    assert kept(3, 0.7) == [1, 3]


def test_sampled_frequencies_follow_the_truncated_distribution():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().repeat(20000, 1)
    tok, _ = sample_tokens(logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=4).float() / tok.numel()
    torch.testing.assert_close(freq, probs, rtol=0, atol=0.015)
    tok, _ = sample_tokens(logits, SamplingParams(temperature=1.0, top_p=0.7), torch.Generator().manual_seed(0))
    freq = torch.bincount(tok, minlength=4).float() / tok.numel()
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.625, 0.0, 0.375]), rtol=0, atol=0.015)
    # temperature 0.5 squares the probabilities (renormalised)
    tok, _ = sample_tokens(logits, SamplingParams(temperature=0.5), torch.Generator().manual_seed(1))
    freq = torch.bincount(tok, minlength=4).float() / tok.numel()
    torch.testing.assert_close(freq, probs**2 / (probs**2).sum(), rtol=0, atol=0.015)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_params_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
