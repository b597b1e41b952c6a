"""The continuous-batching engine's request API on a tiny HF model (tp 1; tp 2 in test_generate_cli.py):
sequences join mid-way under a row budget and still give transformers' greedy tokens (with and without the
look-ahead window); prefix-shared n-sample prefill gives the log-probs of separate prefill; pause -> append ->
resume equals generating from the concatenated prompt; a KV pool too small for all rows preempts and recomputes,
same tokens.

Tolerances: tokens exact. Log-probs 1e-5 (fp32): shared and separate prefill run the same ops on the
same values except for the batch a prompt row sits in and the copy of its partial block (exact), so
they differ only by reduction-order rounding, ~1e-7 relative on log-probs of magnitude <= ~10.
"""

import pytest
import torch

from rollout_refs import NEVER, TEXT_PROMPTS, build_engine, hf_greedy, tokenize
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


@pytest.mark.parametrize("look_ahead,sync_every", [(True, 1), (True, 3), (False, 3)])
def test_requests_join_mid_way_and_match_transformers(hf_dir, case, look_ahead, sync_every):
    """Also with the look-ahead window (rows continuing from the window in flight feed the token it sampled last,
    on the device; a row that ended is decoded one window more and its tokens there dropped) and without it."""
    engine, _ = build_engine(hf_dir, 1, case["eos"], max_batch=2, look_ahead=look_ahead, sync_every=sync_every)
    rids = [engine.add_request(p, RequestParams(GREEDY, MAX_NEW)) for p in case["ids"]]
    got, running_sets = {}, []
    while engine.has_unfinished():
        for done in engine.step():
            got[done.request_id] = done.token_ids
        running_sets.append({s.request_id for s in engine.scheduler.running})
    assert [got[r] for r in rids] == case["ref"]
    # a request admitted after the first ones (id >= 2) ran beside one of them: it joined mid-way
    assert any(s & {0, 1} and s - {0, 1} for s in running_sets)
    assert max(len(s) for s in running_sets) <= 2


def test_prefix_shared_samples_match_separate_prefill(hf_dir, case):
    ids = case["ids"][:4]
    kw = dict(max_new_tokens=MAX_NEW, temperature=0.9, n=3, seed=7)
    shared, _ = build_engine(hf_dir, 1, eos_token_id=NEVER, max_batch=12)
    separate, _ = build_engine(hf_dir, 1, eos_token_id=NEVER, max_batch=12, share_prefix=False)
    a, b = shared.generate(ids, **kw), separate.generate(ids, **kw)
    assert a.responses() == b.responses()
    torch.testing.assert_close(a.response_logprobs, b.response_logprobs, rtol=0, atol=1e-5)
    # the shared engine prefilled each prompt once: the samples' first (full) blocks are the same blocks
    engine, _ = build_engine(hf_dir, 1, eos_token_id=NEVER, max_batch=12)
    engine.add_request(case["ids"][5], RequestParams(GREEDY, 4, n=3))
    engine.step()
    tables = [s.blocks for s in engine.scheduler.running]
    full = len(case["ids"][5]) // engine.block_size
    assert full >= 1 and all(t[:full] == tables[0][:full] for t in tables)
    assert len({t[full] for t in tables}) == 3  # the partial last block is each sample's own copy


def test_pause_append_resume_equals_concatenated_prompt(hf_dir, case):
    prompt, tool = case["ids"][2], case["ids"][1]
    engine, _ = build_engine(hf_dir, 1, eos_token_id=NEVER)
    rid = engine.add_request(prompt, RequestParams(GREEDY, 5, keep_cache=True))
    first = [d for _ in range(10) if engine.has_unfinished() for d in engine.step()]
    assert [d.token_ids for d in first] == [case["no_stop"][2][:5]]
    engine.append(rid, tool, max_new_tokens=6)
    resumed = [d for _ in range(10) if engine.has_unfinished() for d in engine.step()]
    engine.release_request(rid)
    whole, _ = build_engine(hf_dir, 1, eos_token_id=NEVER)
    direct = whole.generate([prompt + first[0].token_ids + tool], max_new_tokens=6, temperature=0.0)
    assert [d.token_ids for d in resumed] == direct.responses()
    torch.testing.assert_close(torch.tensor(resumed[0].logprobs), direct.response_logprobs[0], rtol=0, atol=1e-5)
    assert engine.scheduler.blocks.num_free == engine.cache.num_blocks - 1  # everything returned to the pool
    with pytest.raises(ValueError, match="not paused"):
        engine.append(rid, tool)


def test_small_kv_pool_preempts_and_recomputes(hf_dir, case):
    # 4-token blocks, 80 tokens: the 6 rows (155 tokens at the end, no early stop) cannot all stay resident
    engine, _ = build_engine(hf_dir, 1, NEVER, max_batch=6, max_seq_len=64, max_tokens=80, sync_every=1)
    out = engine.generate(case["ids"], max_new_tokens=MAX_NEW, temperature=0.0)
    assert out.responses() == case["no_stop"]
    assert engine.scheduler.preemptions > 0
    assert engine.scheduler.blocks.num_free == engine.cache.num_blocks - 1
