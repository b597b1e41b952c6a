"""The engine's `eos_at` hook (forced response lengths, for benchmarks with random weights): each row
ends with EOS as exactly its token number eos_at[r] (or runs to max_new_tokens when that comes first),
the tokens before it are the ones the engine samples without forcing, and the forced EOS carries the
teacher-forced log-prob of EOS.

Tolerance: log-probs 1e-5 in fp32, as in test_generation_engine.py (the same forward in another batch
shape: reduction-order rounding ~1e-7 relative on log-probs of magnitude <= ~10).
"""

import pytest
import torch

from rollout_refs import NEVER, TEXT_PROMPTS, build_engine, hf_greedy, teacher_forced_logprobs, tokenize

MAX_NEW = 10


@pytest.fixture(scope="module")
def case(hf_dir):
    """Prompts, greedy responses without stopping, and an EOS id none of them emits (no natural stop)."""
    ids = tokenize(hf_dir, TEXT_PROMPTS)
    no_stop = hf_greedy(hf_dir, ids, NEVER, MAX_NEW)
    eos = next(t for t in range(3, 130) if all(t not in r for r in no_stop))
    return {"ids": ids, "no_stop": no_stop, "eos": eos}


def test_greedy_rows_end_at_the_forced_lengths(hf_dir, case):
    engine, model = build_engine(hf_dir, 1, case["eos"], max_batch=3, sync_every=4)  # rows join mid-way
    eos_at = [3, 1, MAX_NEW + 5, 7]  # the third exceeds max_new_tokens: runs to it, not forced
    out = engine.generate(case["ids"], max_new_tokens=MAX_NEW, temperature=0.0, eos_at=eos_at)
    want = [r[:k - 1] + [case["eos"]] if k <= MAX_NEW else r for r, k in zip(case["no_stop"], eos_at)]
    assert out.responses() == want
    torch.testing.assert_close(out.response_logprobs, teacher_forced_logprobs(model, out, 1.0), rtol=0, atol=1e-5)
    # the hook is per call: the next call generates unforced
    assert engine.generate(case["ids"], max_new_tokens=MAX_NEW, temperature=0.0).responses() == case["no_stop"]


def test_sampled_rows_and_ignore_eos(hf_dir, case):
    engine, model = build_engine(hf_dir, 1, case["eos"], max_batch=8)
    eos_at = [2, 5, 9, 1, 4, 4, 6, 3]
    out = engine.generate(case["ids"], max_new_tokens=MAX_NEW, temperature=0.8, n=2, seed=3, eos_at=eos_at,
                          ignore_eos=True)  # the forced EOS still stops its row
    assert [len(r) for r in out.responses()] == eos_at
    assert all(r[-1] == case["eos"] for r in out.responses())
    torch.testing.assert_close(out.response_logprobs, teacher_forced_logprobs(model, out, 0.8), rtol=0, atol=1e-5)


def test_bad_eos_at_raises(hf_dir, case):
    engine, _ = build_engine(hf_dir, 1, case["eos"])
    for bad in ([1, 2, 3], [1, 2, 0, 4]):
        with pytest.raises(ValueError, match="eos_at"):
            engine.generate(case["ids"], max_new_tokens=MAX_NEW, eos_at=bad)
        assert not engine.has_unfinished()  # nothing was queued


def test_worker_passes_eos_at_per_row(hf_dir, case):
    from verl_mega.rollout.sampling import SamplingParams
    from verl_mega.rollout.worker import InPlaceWeights, RolloutWorker

    _, model = build_engine(hf_dir, 1, case["eos"])
    worker = RolloutWorker(InPlaceWeights(model, None), eos_token_ids=[case["eos"]], pad_token_id=0)
    eos_at = [4, 1, 6, 2, 3, 5, 7, 8]
    out = worker.generate(case["ids"], max_new_tokens=MAX_NEW, sampling=SamplingParams(temperature=1.0), n=2,
                          eos_at=eos_at)
    assert [len(r) for r in out.responses] == eos_at and all(r[-1] == case["eos"] for r in out.responses)
    with pytest.raises(ValueError, match="eos_at"):
        worker.generate(case["ids"], max_new_tokens=MAX_NEW, sampling=SamplingParams(), n=2, eos_at=eos_at[:4])
