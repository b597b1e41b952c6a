"""GenerationEngine on a tiny HF model: greedy parity with transformers' generate (tp 1 and 2),
EOS stop, teacher-forced log-probs, seeded sampling, n-sample layout, top-k=1 == greedy.

Tolerances: tokens exact; log-probs 1e-5 (fp32) against log_softmax of a full forward.
"""

import os

import pytest
import torch

from verl_mega.testing.multiprocess import run_distributed

PROMPTS = ["Hello there, how", "a", "The quick brown fox jumps", "42 + 7 ="]
MAX_NEW = 12
NEVER = 10_000  # an "EOS" id outside the vocabulary: rows never stop early


def _hf_dir(tmp_path_factory) -> str:
    from verl_mega.testing.tiny_hf import make_tiny_hf_model

    return make_tiny_hf_model(str(tmp_path_factory.mktemp("tiny_qwen2")), arch="qwen2", vocab_size=130, seed=3)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return _hf_dir(tmp_path_factory)


def _prompt_ids(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    return [tok(p)["input_ids"] for p in PROMPTS], tok


def hf_greedy(path, eos_token_id, max_new_tokens=MAX_NEW) -> list[list[int]]:
    """transformers' greedy generate with left padding; returns each row's response up to and
    including EOS (HF pads finished rows with pad_token_id)."""
    from transformers import AutoModelForCausalLM

    ids, tok = _prompt_ids(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = tok.pad({"input_ids": ids}, return_tensors="pt", padding_side="left")
    out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                         pad_token_id=tok.pad_token_id, top_k=None, top_p=None, temperature=None)
    responses = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        resp = []
        for t in row:
            resp.append(t)
            if t == eos_token_id:
                break
        responses.append(resp)
    return responses


def build_engine(path, tp, eos_token_id, **kw):
    """Our one-stage model loaded from the HF directory, TP over a fresh layout, and its engine."""
    from verl_mega.models.config import ModelConfig
    from verl_mega.models.hf_io import load_hf_weights
    from verl_mega.models.parallelize import build_stage
    from verl_mega.parallel.layout import Layout
    from verl_mega.rollout.engine import GenerationEngine

    layout = Layout.create(tp=tp, pp=1)
    model = build_stage(ModelConfig.from_hf(path), layout, init_seed=None)
    load_hf_weights(model, path)
    model.eval()
    engine = GenerationEngine(model, layout.tp_group, max_batch=kw.pop("max_batch", 8), max_seq_len=64,
                              eos_token_ids=[eos_token_id], pad_token_id=0, kv_len_bucket=16, **kw)
    return engine, model


def teacher_forced_logprobs(model, out, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of a full forward over [prompt | response] at the response tokens [N, R]."""
    from verl_mega.rollout.sampling import gather_vocab_logits

    p_len = out.prompt_ids.shape[1]
    with torch.no_grad():
        logits = model(out.input_ids, out.position_ids, out.attention_mask)  # [N, P+R, V_local]
    n, s, v = logits.shape
    full = gather_vocab_logits(logits.reshape(n * s, v), model.tp_group, model.true_vocab_size).view(n, s, -1)
    logp = torch.log_softmax(full[:, p_len - 1:-1] / temperature, dim=-1)  # predicts response tokens
    return logp.gather(-1, out.response_ids[..., None]).squeeze(-1) * out.response_mask


def _eos_from_greedy(responses) -> int:
    """A token the greedy run emits mid-way in row 0: using it as EOS makes rows stop at different steps."""
    return responses[0][4]


def test_greedy_matches_transformers_and_stops_on_eos(hf_dir):
    ids, _ = _prompt_ids(hf_dir)
    ref_no_stop = hf_greedy(hf_dir, eos_token_id=NEVER)
    eos = _eos_from_greedy(ref_no_stop)
    ref = hf_greedy(hf_dir, eos_token_id=eos)
    assert any(len(r) < MAX_NEW for r in ref) and any(len(r) == MAX_NEW for r in ref), "test needs mixed stops"
    engine, _ = build_engine(hf_dir, 1, eos)
    out = engine.generate(ids, max_new_tokens=MAX_NEW, temperature=0.0)
    assert out.responses() == ref
    # finished rows are padded, mask marks exactly the response tokens (EOS included)
    assert out.response_mask.sum(-1).tolist() == [len(r) for r in ref]
    assert (out.response_ids[out.response_mask == 0] == 0).all()
    # ignore_eos runs every row to max_new_tokens and gives the no-stop greedy tokens
    assert engine.generate(ids, max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True).responses() == ref_no_stop
    # chunked (max_batch smaller than the batch) gives the same tokens
    small, _ = build_engine(hf_dir, 1, eos, max_batch=3)
    assert small.generate(ids, max_new_tokens=MAX_NEW, temperature=0.0).responses() == ref


def test_sampling_logprobs_seed_n_and_top_k(hf_dir):
    ids, _ = _prompt_ids(hf_dir)
    engine, model = build_engine(hf_dir, 1, eos_token_id=5)
    kw = dict(max_new_tokens=MAX_NEW, temperature=0.8, top_k=40, top_p=0.95, n=3)
    out = engine.generate(ids, seed=11, **kw)
    # n-sample layout: rows i*n .. i*n+n-1 hold prompt i (left-padded)
    assert out.prompt_ids.shape[0] == len(ids) * 3
    for i, p in enumerate(ids):
        for j in range(3):
            row = out.prompt_ids[i * 3 + j]
            assert row[out.prompt_mask[i * 3 + j].bool()].tolist() == p
    assert len({tuple(r) for r in out.responses()}) > len(ids)  # samples differ
    # log-probs of sampled tokens = teacher-forced log_softmax(logits / T) (untruncated)
    ref = teacher_forced_logprobs(model, out, temperature=0.8)
    torch.testing.assert_close(out.response_logprobs, ref, rtol=0, atol=1e-5)
    # seeded: reproducible, and the seed matters
    again = engine.generate(ids, seed=11, **kw)
    assert again.responses() == out.responses() and torch.equal(again.response_logprobs, out.response_logprobs)
    assert engine.generate(ids, seed=12, **kw).responses() != out.responses()
    # top_k = 1 samples the argmax: equals greedy
    greedy = engine.generate(ids, max_new_tokens=MAX_NEW, temperature=0.0).responses()
    assert engine.generate(ids, max_new_tokens=MAX_NEW, temperature=1.3, top_k=1, seed=5).responses() == greedy
    # trainer view: [prompt | response] with positions continuing over the response
    p_len = out.prompt_ids.shape[1]
    assert torch.equal(out.input_ids[:, p_len:], out.response_ids)
    assert torch.equal(out.position_ids[:, p_len], out.prompt_mask.sum(-1))


def test_bad_inputs_raise(hf_dir):
    engine, _ = build_engine(hf_dir, 1, eos_token_id=5)
    for bad, kw in [([[]], {}), ([[1, 2]], dict(n=0)), ([[1, 2]], dict(max_new_tokens=0)),
                    ([[1] * 60], dict(max_new_tokens=10)), ([[1, 500]], {})]:
        with pytest.raises(ValueError):
            engine.generate(bad, **{"max_new_tokens": 4, **kw})


def _tp2_worker(path, eos, out_jsonl_dir):
    """At tp 2: greedy tokens, sampled tokens on both ranks, log-probs vs teacher forcing, CLI run."""
    torch.manual_seed(0)
    ids, _ = _prompt_ids(path)
    engine, model = build_engine(path, 2, eos)
    greedy = engine.generate(ids, max_new_tokens=MAX_NEW, temperature=0.0).responses()
    sampled = engine.generate(ids, max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.9, n=2, seed=3)
    lp_err = (sampled.response_logprobs - teacher_forced_logprobs(model, sampled, 1.0)).abs().max().item()
    cli_rc = None
    if out_jsonl_dir is not None:
        from verl_mega.cli import main

        cli_rc = main(["generate", "--model", path, "--prompts", os.path.join(out_jsonl_dir, "in.jsonl"),
                       "--out", os.path.join(out_jsonl_dir, "out_tp2.jsonl"), "--tp", "2",
                       "--max-new-tokens", str(MAX_NEW), "--temperature", "0"])
    return {"greedy": greedy, "sampled": sampled.responses(), "lp_err": lp_err, "cli_rc": cli_rc}


def test_tp2_greedy_matches_transformers(hf_dir):
    ref_no_stop = hf_greedy(hf_dir, eos_token_id=NEVER)
    eos = _eos_from_greedy(ref_no_stop)
    ref = hf_greedy(hf_dir, eos_token_id=eos)
    results = run_distributed(_tp2_worker, 2, hf_dir, eos, None)
    for r in results:
        assert r["greedy"] == ref
        assert r["lp_err"] < 1e-5
    assert results[0]["sampled"] == results[1]["sampled"]  # both tp ranks draw the same tokens
