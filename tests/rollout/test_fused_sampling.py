"""The one-pass Triton sampler (`rollout/fused_sampling.py`) against `sampling.sample_tokens`: greedy tokens and
log-probs equal, forced tokens honoured, sampled tokens drawn from softmax(x / T) (a chi-square test on 4,000
draws), the same generator state giving the same tokens, and the engine's greedy output and forced lengths
unchanged with it.

On CPU the kernel runs in the Triton interpreter, switched on before triton is first imported: the checks run
in a fresh subprocess with TRITON_INTERPRET=1 (with CUDA, in this process on CUDA tensors).
"""

import json
import os
import subprocess
import sys

import torch

from tests.run_python import child_env
from rollout_refs import NEVER, TEXT_PROMPTS, build_engine, tokenize

HERE = os.path.dirname(os.path.abspath(__file__))

# chi-square with 4 degrees of freedom (5 tokens): P(statistic > 23.5) = 1e-4 for a correct sampler
CHI2_4DOF_1E4 = 23.5


def sampler_checks(device: str) -> dict:
    """The comparisons of the module docstring, as numbers (asserted by the test)."""
    from verl_mega.rollout.fused_sampling import BLOCK, sample_tokens_fused
    from verl_mega.rollout.sampling import SamplingParams, sample_tokens

    gen = torch.Generator().manual_seed(0)
    vocab = 2 * BLOCK + 37  # three blocks, the last one partial
    logits = torch.randn(6, vocab, generator=gen) * 3
    logits[0, :BLOCK] = float("-inf")  # a first block of -inf only (masked tokens)
    logits[1, 11] = 40.0
    logits[2, 5] = logits[2, 3 * 1024 + 7] = 50.0  # a tie across vocabulary parts: the lower index, as torch.argmax
    logits = logits.to(device)
    # a column of a wider tensor, as the engine passes it (row r's id is not at offset r)
    forced = torch.tensor([[-1, 5], [7, 5], [-1, 5], [-1, 5], [2, 5], [-1, 5]], device=device)[:, 0]
    out = {}
    greedy = SamplingParams(temperature=0.0)
    tok, lp = sample_tokens_fused(logits, greedy, forced=forced)
    ref_tok, ref_lp = sample_tokens(logits, greedy, forced=forced)
    out["greedy_equal"] = tok.tolist() == ref_tok.tolist()
    out["greedy_logprob_error"] = float((lp - ref_lp).abs().max())
    warm = SamplingParams(temperature=0.7)
    g = torch.Generator(device=device).manual_seed(5)
    tok, lp = sample_tokens_fused(logits, warm, g, forced)
    expected = torch.log_softmax(logits / 0.7, dim=-1).gather(1, tok[:, None])[:, 0]
    out["sampled_logprob_error"] = float((lp - expected).abs().max())
    out["forced_kept"] = tok[1].item() == 7 and tok[4].item() == 2
    out["masked_never_drawn"] = tok[0].item() >= BLOCK
    g.manual_seed(5)
    out["same_seed_same_tokens"] = sample_tokens_fused(logits, warm, g, forced)[0].tolist() == tok.tolist()
    # the vocabulary (5 blocks of 1024) cut into 2 and 4 parts (the last part past the vocabulary, empty): the
    # same draws (Philox counters do not depend on the cut) and log-probs to float32 rounding
    out["split_same_tokens"], out["split_logprob_error"] = True, 0.0
    for params, seed in ((greedy, None), (warm, 5)):
        whole = sample_tokens_fused(logits, params, g.manual_seed(seed) if seed else None, forced, block=1024,
                                    splits=1)
        for splits in (2, 4):
            cut = sample_tokens_fused(logits, params, g.manual_seed(seed) if seed else None, forced, block=1024,
                                      splits=splits)
            out["split_same_tokens"] &= cut[0].tolist() == whole[0].tolist()
            out["split_same_tokens"] &= params is not greedy or cut[0][2].item() == 5
            out["split_logprob_error"] = max(out["split_logprob_error"], float((cut[1] - whole[1]).abs().max()))
    # bf16 logits (the engine passes the head's output as it is): read and widened in the kernel, the same draws
    # and log-probs as the float32 copy of the same values (the widening is exact)
    half = logits.bfloat16()
    got, ref = (sample_tokens_fused(t, warm, g.manual_seed(9), forced) for t in (half, half.float()))
    out["bf16_same"] = got[0].tolist() == ref[0].tolist() and torch.equal(got[1], ref[1])
    # distribution: 1,000 rows of the same 5 finite logits at T = 0.7 (the rest -inf), placed in the four quarters of
    # a 64-entry block (each quarter takes another of Philox's four outputs) and in the next block
    where = torch.tensor([0, 17, 34, 51, 100])
    values = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3])
    small = torch.full((1000, 128), float("-inf"))
    small[:, where] = values
    draws = sample_tokens_fused(small.to(device), warm, torch.Generator(device=device).manual_seed(1), block=64)[0]
    counts = torch.stack([(draws.cpu() == i).sum() for i in where]).double()
    probs = torch.softmax(values.double() / 0.7, dim=0)
    out["chi2"] = float(((counts - 1000 * probs) ** 2 / (1000 * probs)).sum())
    return out


def engine_greedy(hf_dir: str, ids: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Greedy responses of the engine with the fused sampler (rows joining mid-way: max_batch 2 for 4 prompts),
    and the response lengths of a sampled call with forced EOS positions inside 4-step decode windows."""
    engine, model = build_engine(hf_dir, 1, NEVER, max_batch=2, sampler="fused", sync_every=4)
    model.fused_inference = False  # only the sampler in the interpreter
    greedy = engine.generate(ids, max_new_tokens=6, temperature=0.0).responses()
    engine, model = build_engine(hf_dir, 1, 3, max_batch=2, sampler="fused", sync_every=4)  # EOS: a real id
    model.fused_inference = False
    forced = engine.generate(ids, max_new_tokens=12, temperature=1.0, eos_at=[3, 6, 9, 12],
                             ignore_eos=True).responses()  # only the forced EOS ends a row
    return greedy, [len(r) for r in forced]


def engine_bf16(hf_dir: str, ids: list[list[int]]) -> tuple[bool, float]:
    """A bfloat16 copy of the model, greedy: the fused sampler (the head's matmul writes the bf16 logits buffer
    itself) against the torch sampler (a float32 copy of the same logits): (tokens equal, max log-prob diff)."""
    import tempfile

    from verl_mega.rollout.engine import GenerationEngine
    from verl_mega.rollout.engine_config import EngineConfig
    from verl_mega.testing.tiny_hf import make_tiny_hf_model

    # a vocabulary of 256 (no padding of the head): the head writes the logits buffer directly
    _, model = build_engine(make_tiny_hf_model(tempfile.mkdtemp(), arch="qwen2", vocab_size=256, seed=3), 1, NEVER)
    assert model.output_weight().shape[0] == model.true_vocab_size == 256
    model = model.to(torch.bfloat16)
    model.fused_inference = False
    runs = []
    for sampler in ("fused", "torch"):
        config = EngineConfig(max_batch=2, max_seq_len=64, max_tokens=1024, block_size=4, kv_len_bucket=16,
                              sync_every=4, sampler=sampler)
        engine = GenerationEngine(model, None, config, eos_token_ids=[NEVER], pad_token_id=0)
        assert engine._logits.dtype == (torch.bfloat16 if sampler == "fused" else torch.float32)
        runs.append(engine.generate(ids, max_new_tokens=6, temperature=0.0))
    fused, plain = runs
    return fused.responses() == plain.responses(), float((fused.response_logprobs - plain.response_logprobs).abs().max())


def test_fused_sampler_matches_sample_tokens(hf_dir):
    ids = tokenize(hf_dir, TEXT_PROMPTS)
    engine, _ = build_engine(hf_dir, 1, NEVER, max_batch=2)
    reference = engine.generate(ids, max_new_tokens=6, temperature=0.0).responses()
    code = ("import json, sys; sys.path.insert(0, %r); import test_fused_sampling as t; "
            "print(json.dumps([t.sampler_checks('cpu'), t.engine_greedy(%r, %r), t.engine_bf16(%r, %r)]))"
            % (HERE, hf_dir, ids, hf_dir, ids))
    env = child_env(HERE, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    checks, (tokens, forced_lengths), (bf16_equal, bf16_logprob_error) = json.loads(out.stdout.strip().splitlines()[-1])
    runs = [checks] + ([sampler_checks("cuda")] if torch.cuda.is_available() else [])
    for c in runs:
        assert c["greedy_equal"] and c["forced_kept"] and c["masked_never_drawn"] and c["same_seed_same_tokens"], c
        assert c["split_same_tokens"] and c["bf16_same"], c
        # both log-sum-exps of the same float32 logits, summed in other orders: a few float32 ulps of |lse| ~ 10
        assert c["greedy_logprob_error"] < 1e-5 and c["sampled_logprob_error"] < 1e-5, c
        assert c["split_logprob_error"] < 1e-5, c
        assert c["chi2"] < CHI2_4DOF_1E4, c
    assert tokens == reference
    assert forced_lengths == [3, 6, 9, 12]  # forced ids read per row from the staged window (were misread)
    # the same bf16 logits, widened exactly either way; the log-sum-exps differ by float32 summation order
    assert bf16_equal and bf16_logprob_error < 1e-5, (bf16_equal, bf16_logprob_error)
