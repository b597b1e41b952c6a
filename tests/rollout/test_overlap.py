"""Overlapped decode windows (`EngineConfig.overlap`, the CUDA default; here forced on for the CPU): the next window
is launched over the same rows before the last one is read, so a row that finished runs one window more and those
tokens are dropped. The outputs must not change: greedy tokens equal transformers' with rows joining mid-way
and stopping at different steps, forced lengths and scripted turns land where they are forced, pause -> append
-> resume equals the concatenated prompt, a pool too small for the look-ahead falls back to the read-then-launch
path (and preempts there), and every block returns to the pool.

Tolerances: tokens exact; log-probs 1e-5 against a teacher-forced forward (fp32; test_continuous_batching.py
derives it).
"""

import pytest
import torch

from rollout_refs import NEVER, TEXT_PROMPTS, build_engine, hf_greedy, teacher_forced_logprobs, tokenize
from verl_mega.rollout.sampling import SamplingParams
from verl_mega.rollout.scheduler import RequestParams

MAX_NEW = 12
GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def case(hf_dir):
    """Six prompts of mixed lengths, an EOS that stops rows at different steps, HF greedy references."""
    ids = tokenize(hf_dir, TEXT_PROMPTS + ["Zebras", "one two three four five six"])
    no_stop = hf_greedy(hf_dir, ids, NEVER, MAX_NEW)
    eos = no_stop[0][4]
    ref = hf_greedy(hf_dir, ids, eos, MAX_NEW)
    assert len({len(r) for r in ref}) > 1, "test needs rows that stop at different steps"
    return {"ids": ids, "eos": eos, "ref": ref, "no_stop": no_stop}


def overlapped(hf_dir, eos, **kw):
    engine, model = build_engine(hf_dir, 1, eos, overlap=True, **kw)
    assert engine.overlap
    return engine, model


def all_returned(engine) -> bool:
    return engine.scheduler.blocks.num_free == engine.cache.num_blocks - 1 and engine._inflight is None


@pytest.mark.parametrize("max_batch,sync_every", [(12, 3), (2, 4), (12, 1)])
def test_greedy_matches_transformers(hf_dir, case, max_batch, sync_every):
    # max_batch 12: every row admitted at once, windows launched ahead until the last row stops;
    # max_batch 2: requests wait, so windows are read before the next launch until the queue empties
    engine, _ = overlapped(hf_dir, case["eos"], max_batch=max_batch, sync_every=sync_every)
    out = engine.generate(case["ids"], max_new_tokens=MAX_NEW, temperature=0.0)
    assert out.responses() == case["ref"]
    assert engine.stats["windows_ahead"] > 0
    assert all_returned(engine)


def test_forced_lengths_and_sampled_logprobs(hf_dir, case):
    engine, model = overlapped(hf_dir, case["eos"], max_batch=12, sync_every=4)
    eos = case["eos"]  # ignore_eos: only the forced EOS ends a row
    eos_at = [3, 1, 9, 7, 12, 5]  # inside, at the edge of, and across 4-step windows
    out = engine.generate(case["ids"], max_new_tokens=MAX_NEW, temperature=0.8, seed=5, eos_at=eos_at,
                          ignore_eos=True)
    assert [len(r) for r in out.responses()] == eos_at and all(r[-1] == eos for r in out.responses())
    torch.testing.assert_close(out.response_logprobs, teacher_forced_logprobs(model, out, 0.8), rtol=0, atol=1e-5)
    again = engine.generate(case["ids"], max_new_tokens=MAX_NEW, temperature=0.8, seed=5, eos_at=eos_at,
                            ignore_eos=True)
    assert again.responses() == out.responses()  # same seed, same config: same tokens
    assert engine.stats["windows_ahead"] > 0 and all_returned(engine)


def test_scripted_turn_pause_append_resume(hf_dir, case):
    prompt, tool = case["ids"][2], case["ids"][1]
    engine, _ = overlapped(hf_dir, NEVER, max_batch=4, sync_every=3)
    rid = engine.add_request(prompt, RequestParams(GREEDY, 5, n=2, keep_cache=True))
    engine.force_tokens(rid, 1, [7, 8])  # sample 1: a scripted start, then greedy
    first = {}
    while engine.has_unfinished():
        for done in engine.step():
            first[done.sample_index] = done.token_ids
    assert first[0] == case["no_stop"][2][:5]
    assert first[1] == [7, 8] + hf_greedy(hf_dir, [prompt + [7, 8]], NEVER, 3)[0]
    engine.append(rid, tool, sample_index=0, max_new_tokens=6)
    resumed = [d.token_ids for _ in range(20) if engine.has_unfinished() for d in engine.step()]
    assert resumed == hf_greedy(hf_dir, [prompt + first[0] + tool], NEVER, 6)
    engine.release_request(rid)
    assert all_returned(engine)


def test_small_pool_falls_back_and_preempts(hf_dir, case):
    # 4-token blocks, 96 tokens: the look-ahead's blocks run short, so windows are read before the next launch
    # and rows are preempted and recomputed there; the tokens do not change
    engine, _ = overlapped(hf_dir, NEVER, max_batch=6, max_seq_len=64, max_tokens=96, sync_every=2)
    out = engine.generate(case["ids"], max_new_tokens=MAX_NEW, temperature=0.0)
    assert out.responses() == case["no_stop"]
    assert engine.scheduler.preemptions > 0 and engine.stats["windows_ahead"] > 0
    assert all_returned(engine)
