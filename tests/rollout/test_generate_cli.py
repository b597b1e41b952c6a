"""`verl-mega generate` at tp 1 (in-process) and tp 2 (spawned gloo ranks) against transformers'
greedy generate; the engine at tp 2 (also with a 2-row budget for 4 requests: continuous batching)
and `generate(actor)` at pp 2 (HybridEngine) in the same spawn; input errors. Tokens compared exactly."""

import json
import os

import pytest
import torch

from rollout_refs import CHAT_PROMPT, NEVER, TEXT_PROMPTS, build_engine, hf_greedy, teacher_forced_logprobs, tokenize
from verl_mega.apps.cli import main
from verl_mega.testing.multiprocess import run_distributed

MAX_NEW = 10
EOS = 5  # <|im_end|>, the tiny tokenizer's and config's eos


@pytest.fixture(scope="module")
def cli_case(hf_dir, tmp_path_factory):
    """in.jsonl (text and chat prompts with extra fields) and transformers' greedy responses for it."""
    d = tmp_path_factory.mktemp("cli")
    records = [{"prompt": p, "id": k} for k, p in enumerate(TEXT_PROMPTS)] + [{"messages": CHAT_PROMPT, "id": 99}]
    path = os.path.join(d, "in.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    prompts = [r.get("prompt", r.get("messages")) for r in records]
    return {"dir": str(d), "in": path, "records": records, "ref": hf_greedy(hf_dir, tokenize(hf_dir, prompts), EOS, MAX_NEW)}


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _args(hf_dir, inp, out, *extra):
    return ["generate", "--model", hf_dir, "--prompts", inp, "--out", out, "--max-new-tokens", str(MAX_NEW), *extra]


def test_cli_tp1_greedy_matches_transformers(hf_dir, cli_case):
    from verl_mega.models.tokenizer import load_tokenizer

    out = os.path.join(cli_case["dir"], "out_tp1.jsonl")
    assert main(_args(hf_dir, cli_case["in"], out, "--temperature", "0", "--batch-size", "3")) == 0
    lines = _read(out)
    tok = load_tokenizer(hf_dir)
    assert [line["response_ids"] for line in lines] == [[ids] for ids in cli_case["ref"]]  # one schema for every n
    for rec, line in zip(cli_case["records"], lines):
        assert {k: line[k] for k in rec} == rec  # input fields kept, order kept
        assert line["responses"] == [tok.decode(line["response_ids"][0], skip_special_tokens=True)]


def test_cli_reads_the_training_format_jsonl_and_parquet(hf_dir, cli_case, capsys):
    """verl-format rows (chat-list `prompt`, data_source, reward_model) as parquet and jsonl: the same greedy
    responses as the `messages` form of the same chat."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": CHAT_PROMPT, "data_source": "gsm8k", "reward_model": {"ground_truth": "7"}}] * 2
    outs = []
    for kind in ("jsonl", "parquet"):
        inp = os.path.join(cli_case["dir"], f"train_format.{kind}")
        if kind == "parquet":
            pq.write_table(pa.Table.from_pylist(rows), inp)
        else:
            with open(inp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        out = os.path.join(cli_case["dir"], f"out_{kind}.jsonl")
        assert main(_args(hf_dir, inp, out, "--temperature", "0")) == 0, capsys.readouterr().err
        outs.append(_read(out))
    assert outs[0] == outs[1]
    assert all(line["response_ids"] == [cli_case["ref"][-1]] for line in outs[0])  # the chat record's reference
    assert outs[1][0]["reward_model"] == {"ground_truth": "7"}
    assert main(["generate", "--help"]) == 0
    assert "(default: 1.0)" in capsys.readouterr().out  # sampling temperature shown


def test_cli_n_samples_layout(hf_dir, cli_case):
    out = os.path.join(cli_case["dir"], "out_n.jsonl")
    assert main(_args(hf_dir, cli_case["in"], out, "--n", "3", "--temperature", "1.0", "--top-p", "0.9",
                      "--seed", "4")) == 0
    lines = _read(out)
    assert len(lines) == len(cli_case["records"])
    for line in lines:
        assert len(line["responses"]) == 3 and len(line["response_ids"]) == 3
        assert all(isinstance(ids, list) and 1 <= len(ids) <= MAX_NEW for ids in line["response_ids"])
    again = os.path.join(cli_case["dir"], "out_n2.jsonl")
    assert main(_args(hf_dir, cli_case["in"], again, "--n", "3", "--temperature", "1.0", "--top-p", "0.9",
                      "--seed", "4")) == 0
    assert _read(again) == lines  # seeded


def test_cli_input_errors(hf_dir, tmp_path, capsys):
    out = str(tmp_path / "out.jsonl")
    assert main(_args(hf_dir, str(tmp_path / "missing.jsonl"), out)) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": "unterminated\n')
    assert main(_args(hf_dir, str(bad), out)) == 2
    assert "bad.jsonl: row 1: invalid JSON" in capsys.readouterr().err
    neither = tmp_path / "neither.jsonl"
    neither.write_text('{"prompt": "ok"}\n\n{"text": "no prompt"}\n')
    assert main(_args(hf_dir, str(neither), out)) == 2
    assert "neither.jsonl: row 1: no 'prompt' (or 'messages') column" in capsys.readouterr().err
    assert main(_args(hf_dir, str(bad), out, "--n", "0")) == 2
    capsys.readouterr()
    # layouts, named by flag, with how to launch (before any weight loads)
    assert main(_args(hf_dir, str(bad), out, "--tp", "3")) == 2
    assert f"--tp 3 does not fit the model at --model {hf_dir}: num_heads" in capsys.readouterr().err
    assert main(_args(hf_dir, str(bad), out, "--tp", "2")) == 2
    assert "--tp 2 needs a multiple of 2 processes, but 1 were started; launch with `torchrun --nproc-per-node 2" \
        in capsys.readouterr().err
    good = str(tmp_path / "good.jsonl")  # prompt + --max-new-tokens beyond max_position_embeddings (256)
    with open(good, "w") as f:
        f.write(json.dumps({"prompt": "one two three"}) + "\n")
    assert main(["generate", "--model", hf_dir, "--prompts", good, "--out", out, "--max-new-tokens", "256"]) == 2
    assert "--max-new-tokens 256 leaves no room for a prompt within the model's max_position_embeddings=256" \
        in capsys.readouterr().err
    assert main(["generate", "--model", hf_dir, "--prompts", good, "--out", out, "--max-new-tokens", "254"]) == 2
    err = capsys.readouterr().err
    assert f"--max-new-tokens 254 with the longest prompt of {good}" in err and "max_position_embeddings=256" in err
    assert main(_args(hf_dir, str(bad), out, "--top-p", "2")) == 2
    assert "--top-p must be in (0, 1], got 2.0" in capsys.readouterr().err
    assert main(_args(hf_dir, str(bad), str(tmp_path))) == 2  # an output path that cannot be written: before loading
    assert f"--out {tmp_path} is a directory" in capsys.readouterr().err
    assert main(_args(hf_dir, str(bad), str(bad / "x.jsonl"))) == 2
    assert f"{bad} is a file, not a directory" in capsys.readouterr().err
    assert not os.path.exists(out)


def _distributed_worker(hf_dir, ids, eos, cli_in, cli_out):
    """Both ranks: engine at tp 2 (greedy, sampling, log-probs), the CLI at tp 2, generate(actor) at pp 2."""
    from verl_mega.rollout.actor import get_actor_model

    engine, model = build_engine(hf_dir, 2, eos)
    greedy = engine.generate(ids, max_new_tokens=MAX_NEW, temperature=0.0).responses()
    # continuous batching with 2 rows for 4 requests (they join as others finish), 3 decode steps per host check
    small, _ = build_engine(hf_dir, 2, eos, max_batch=2, sync_every=3)
    joined = small.generate(ids, max_new_tokens=MAX_NEW, temperature=0.0).responses()
    sampled = engine.generate(ids, max_new_tokens=MAX_NEW, temperature=1.0, top_p=0.9, n=2, seed=3)
    lp_err = (sampled.response_logprobs - teacher_forced_logprobs(model, sampled, 1.0)).abs().max().item()
    cli_rc = main(_args(hf_dir, cli_in, cli_out, "--tp", "2", "--temperature", "0"))
    actor = get_actor_model(hf_dir, tensor_parallel_size=1, pipeline_parallel_size=2)
    pp_greedy = [r["response_ids"] for r in actor.generate(ids, max_new_tokens=MAX_NEW, temperature=0.0, stop_token_ids=[eos])]
    return {"greedy": greedy, "joined": joined, "sampled": sampled.responses(), "lp_err": lp_err, "cli_rc": cli_rc, "pp_greedy": pp_greedy}


def test_tp2_engine_cli_and_pp2_match_transformers(hf_dir, cli_case):
    ids = tokenize(hf_dir, TEXT_PROMPTS)
    eos = hf_greedy(hf_dir, ids, NEVER, MAX_NEW)[0][3]  # stops row 0 early
    ref = hf_greedy(hf_dir, ids, eos, MAX_NEW)
    out = os.path.join(cli_case["dir"], "out_tp2.jsonl")
    results = run_distributed(_distributed_worker, 2, hf_dir, ids, eos, cli_case["in"], out)
    for r in results:
        assert r["greedy"] == ref
        assert r["joined"] == ref
        assert r["lp_err"] < 1e-5
        assert r["cli_rc"] == 0
    assert results[0]["sampled"] == results[1]["sampled"]  # both tp ranks draw the same tokens
    assert [line["response_ids"] for line in _read(out)] == [[ids] for ids in cli_case["ref"]]
    # pp 2: stops at the tokenizer EOS and at `eos` (a stop id): compare with HF stopping at both
    pp_ref = hf_greedy(hf_dir, ids, [EOS, eos], MAX_NEW)
    for r in results:
        assert r["pp_greedy"] == pp_ref
