"""The engine's `eos_at` hook (forced response lengths, for benchmarks with random weights): each row
ends with EOS as exactly its token number eos_at[r] (or runs to max_new_tokens when that comes first),
the tokens before it are the ones the engine samples without forcing, and the forced EOS carries the
teacher-forced log-prob of EOS. Its generalisation `force_tokens` (a scripted turn, e.g. a tool call):
the scripted tokens come out with their teacher-forced log-probs, then the row samples on, for one turn.

Tolerance: log-probs 1e-5 in fp32, as in test_generation_engine.py (the same forward in another batch
shape: reduction-order rounding ~1e-7 relative on log-probs of magnitude <= ~10).
"""

import pytest
import torch

from rollout_refs import NEVER, TEXT_PROMPTS, build_engine, hf_greedy, teacher_forced_logprobs, tokenize
from verl_mega.rollout.scheduler import RequestParams

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
    outside, _ = build_engine(hf_dir, 1, NEVER)  # an EOS id outside the vocabulary: nothing to force
    with pytest.raises(ValueError, match=r"eos_at forces the engine's first eos_token_id, which must be a token"):
        outside.generate(case["ids"], max_new_tokens=MAX_NEW, eos_at=[1, 2, 3, 4])


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


def _run(engine) -> dict:
    """Step the engine until idle: {(request id, sample): (token ids, log-probs)} of the turns that finished."""
    done = {}
    while engine.has_unfinished():
        for f in engine.step():
            done[(f.request_id, f.sample_index)] = (f.token_ids, f.logprobs)
    return done


def test_force_tokens_scripts_one_turn(hf_dir, case):
    from verl_mega.rollout.output import assemble_output
    from verl_mega.rollout.sampling import SamplingParams
    from verl_mega.rollout.scheduler import RequestParams

    engine, model = build_engine(hf_dir, 1, case["eos"], sync_every=4)  # scripts span decode windows
    prompt, eos = case["ids"][2], case["eos"]
    rid = engine.add_request(prompt, RequestParams(SamplingParams(temperature=0.0), MAX_NEW, n=2, keep_cache=True))
    engine.force_tokens(rid, 0, [5, 6, 7, 8, 9, eos])  # a scripted turn that stops
    engine.force_tokens(rid, 1, [7, 8])  # a scripted start, then greedy
    first = _run(engine)
    assert first[(rid, 0)][0] == [5, 6, 7, 8, 9, eos]
    assert first[(rid, 1)][0] == [7, 8] + hf_greedy(hf_dir, [prompt + [7, 8]], eos, MAX_NEW - 2)[0]
    out = assemble_output([prompt, prompt], [first[(rid, 0)], first[(rid, 1)]], pad_token_id=0)
    torch.testing.assert_close(out.response_logprobs, teacher_forced_logprobs(model, out, 1.0), rtol=0, atol=1e-5)
    # the script held for that turn only: the resumed sample generates greedily again
    engine.append(rid, [9], sample_index=0, max_new_tokens=4)
    assert _run(engine)[(rid, 0)][0] == hf_greedy(hf_dir, [prompt + [5, 6, 7, 8, 9, eos, 9]], eos, 4)[0]
    engine.release_request(rid)
    for bad in ([], [-1], [5, 130]):  # 130: past the tiny vocabulary (it was an out-of-range read at the next step)
        with pytest.raises(ValueError, match="token_ids"):
            engine.force_tokens(rid, 0, bad)


def test_release_drops_the_scripts_of_unfinished_requests(hf_dir, case):
    """A rollout interrupted mid-way (e.g. ToolsDown) releases the engine; its requests' forced tokens used to stay
    behind and apply to the next requests, whose ids restart at 0 with the new scheduler."""
    engine, _ = build_engine(hf_dir, 1, case["eos"], max_batch=3, sync_every=4)
    engine.add_request(case["ids"][0], RequestParams(max_new_tokens=MAX_NEW), eos_at=[9])
    engine.step()  # prefill + a window: the row runs on, its EOS still ahead
    engine.release()
    out = engine.generate(case["ids"][:1], max_new_tokens=MAX_NEW, temperature=0.0)
    assert out.responses() == case["no_stop"][:1]


def test_rows_with_other_sampling_params_share_a_window(hf_dir, case):
    """One greedy and one temperature-1 request decode in the same windows (one sample_tokens call per params):
    the greedy row is transformers' greedy, the sampled row ends at its forced length."""
    from verl_mega.rollout.sampling import SamplingParams

    engine, _ = build_engine(hf_dir, 1, case["eos"], max_batch=4, sync_every=4)
    greedy = engine.add_request(case["ids"][0], RequestParams(SamplingParams(temperature=0.0), MAX_NEW))
    warm = engine.add_request(case["ids"][1], RequestParams(SamplingParams(temperature=1.0), MAX_NEW),
                              ignore_eos=True, eos_at=[6])
    out = _run(engine)
    assert out[(greedy, 0)][0] == case["no_stop"][0]
    assert len(out[(warm, 0)][0]) == 6 and out[(warm, 0)][0][-1] == case["eos"]
