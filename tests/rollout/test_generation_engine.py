"""GenerationEngine on a tiny HF model: greedy parity with transformers' generate (tp 1 here; tp 2
and pp 2 in test_generate_cli.py), EOS stop, teacher-forced log-probs, seeded sampling, n-sample
layout, top-k=1 == greedy, chunking.

Tolerances: tokens exact; log-probs 1e-5 (fp32) against log_softmax of a full forward.
"""

import pytest
import torch

from rollout_refs import NEVER, TEXT_PROMPTS, build_engine, hf_greedy, teacher_forced_logprobs, tokenize

MAX_NEW = 12


@pytest.fixture(scope="module")
def refs(hf_dir):
    """HF greedy responses without stopping, and with an EOS chosen so rows stop at different steps."""
    ids = tokenize(hf_dir, TEXT_PROMPTS)
    no_stop = hf_greedy(hf_dir, ids, NEVER, MAX_NEW)
    eos = no_stop[0][4]  # a token row 0 emits mid-way
    stop = hf_greedy(hf_dir, ids, eos, MAX_NEW)
    assert any(len(r) < MAX_NEW for r in stop) and any(len(r) == MAX_NEW for r in stop), "test needs mixed stops"
    return {"ids": ids, "no_stop": no_stop, "eos": eos, "stop": stop}


def test_greedy_matches_transformers_and_stops_on_eos(hf_dir, refs):
    ids, ref = refs["ids"], refs["stop"]
    engine, _ = build_engine(hf_dir, 1, refs["eos"])
    out = engine.generate(ids, max_new_tokens=MAX_NEW, temperature=0.0)
    assert out.responses() == ref
    # finished rows are padded; the mask marks exactly the response tokens (EOS included)
    assert out.response_mask.sum(-1).tolist() == [len(r) for r in ref]
    assert (out.response_ids[out.response_mask == 0] == 0).all()
    assert out.response_ids.shape[1] == max(len(r) for r in ref)
    # ignore_eos runs every row to max_new_tokens: the no-stop greedy tokens
    assert engine.generate(ids, max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True).responses() == refs["no_stop"]
    # an extra stop id given per call stops too
    stop_tok = refs["no_stop"][1][2]
    cut = [r[:r.index(stop_tok) + 1] if stop_tok in r else r for r in refs["no_stop"]]
    assert engine.generate(ids, max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True,
                           stop_token_ids=[stop_tok]).responses() == cut
    # chunked (max_batch smaller than the batch) gives the same tokens
    small, _ = build_engine(hf_dir, 1, refs["eos"], max_batch=3)
    assert small.generate(ids, max_new_tokens=MAX_NEW, temperature=0.0).responses() == ref


def test_sampling_logprobs_seed_n_and_top_k(hf_dir, refs):
    ids = refs["ids"]
    engine, model = build_engine(hf_dir, 1, eos_token_id=5)
    kw = dict(max_new_tokens=MAX_NEW, temperature=0.8, top_k=40, top_p=0.95, n=3)
    out = engine.generate(ids, seed=11, **kw)
    # n-sample layout: rows i*n .. i*n+n-1 hold prompt i (left-padded)
    assert out.prompt_ids.shape[0] == len(ids) * 3
    for i, p in enumerate(ids):
        for j in range(3):
            assert out.prompt_ids[i * 3 + j][out.prompt_mask[i * 3 + j].bool()].tolist() == p
    assert len({tuple(r) for r in out.responses()}) > len(ids)  # samples of one prompt differ
    # log-probs of sampled tokens = teacher-forced log_softmax(logits / T) (untruncated)
    torch.testing.assert_close(out.response_logprobs, teacher_forced_logprobs(model, out, 0.8), rtol=0, atol=1e-5)
    # seeded: reproducible, and the seed matters
    again = engine.generate(ids, seed=11, **kw)
    assert again.responses() == out.responses() and torch.equal(again.response_logprobs, out.response_logprobs)
    assert engine.generate(ids, seed=12, **kw).responses() != out.responses()
    # top_k = 1 samples the argmax: equals greedy
    greedy = engine.generate(ids, max_new_tokens=MAX_NEW, temperature=0.0)
    assert engine.generate(ids, max_new_tokens=MAX_NEW, temperature=1.3, top_k=1, seed=5).responses() == greedy.responses()
    # greedy log-probs are log_softmax(logits) (T = 1)
    torch.testing.assert_close(greedy.response_logprobs, teacher_forced_logprobs(model, greedy, 1.0), rtol=0, atol=1e-5)
    # trainer view: [prompt | response], positions continue over the response
    p_len = out.prompt_ids.shape[1]
    assert torch.equal(out.input_ids[:, p_len:], out.response_ids)
    assert torch.equal(out.attention_mask[:, p_len:], out.response_mask)
    assert torch.equal(out.position_ids[:, p_len], out.prompt_mask.sum(-1))


def test_bad_inputs_raise(hf_dir):
    engine, _ = build_engine(hf_dir, 1, eos_token_id=5)
    for bad, kw in [([[]], {}), ([[1, 2]], dict(n=0)), ([[1, 2]], dict(max_new_tokens=0)),
                    ([[1] * 60], dict(max_new_tokens=10)), ([[1, 500]], {}), ([[1, 2]], dict(top_p=0.0))]:
        with pytest.raises(ValueError):
            engine.generate(bad, **{"max_new_tokens": 4, **kw})


def test_decode_row_buckets():
    """Live rows run as 1, 2, 4, 8, then multiples of graph_batch_step, capped at max_batch; a bad step is an error
    naming the field."""
    from verl_mega.rollout.engine import batch_bucket
    from verl_mega.rollout.engine_config import EngineConfig

    assert [batch_bucket(b, 512) for b in (1, 2, 3, 5, 8, 9, 17, 250, 512)] == [1, 2, 4, 8, 8, 16, 32, 256, 512]
    assert [batch_bucket(b, 512, 8) for b in (9, 17, 250, 511)] == [16, 24, 256, 512]
    assert batch_bucket(250, 252, 8) == 252
    with pytest.raises(ValueError, match="graph_batch_step"):
        EngineConfig(graph_batch_step=0)
