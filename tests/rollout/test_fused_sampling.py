"""The one-pass Triton sampler (`rollout/fused_sampling.py`) against `sampling.sample_tokens`: greedy tokens and
log-probs equal, forced tokens honoured, sampled tokens drawn from softmax(x / T) (a chi-square test on 1,000
draws), the same generator state giving the same tokens, bf16 logits read as their float32 values, and the
engine's greedy output and forced lengths unchanged with it.

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
    # the engine passes the LM head's bf16 output as it is: the same tokens and log-probs as its float32 copy
    low = logits.bfloat16()
    in_bf16 = sample_tokens_fused(low, warm, g.manual_seed(5), forced)
    in_fp32 = sample_tokens_fused(low.float(), warm, g.manual_seed(5), forced)
    out["bf16_as_float32"] = torch.equal(in_bf16[0], in_fp32[0]) and torch.equal(in_bf16[1], in_fp32[1])
    # the vocabulary cut into 2 and 4 parts of 1024-entry blocks (the last part past the vocabulary, empty):
    # the same draws (one uniform per row, whatever the cut; only the float32 summation order changes) and
    # log-probs to float32 rounding
    out["split_same_tokens"], out["split_logprob_error"] = True, 0.0
    for params, seed in ((greedy, None), (warm, 5)):
        whole = sample_tokens_fused(logits, params, g.manual_seed(seed) if seed else None, forced, splits=1)
        for splits in (2, 4):
            cut = sample_tokens_fused(logits, params, g.manual_seed(seed) if seed else None, forced, block=1024,
                                      splits=splits)
            out["split_same_tokens"] &= cut[0].tolist() == whole[0].tolist()
            out["split_same_tokens"] &= params is not greedy or cut[0][2].item() == 5
            out["split_logprob_error"] = max(out["split_logprob_error"], float((cut[1] - whole[1]).abs().max()))
    # distribution: 1,000 rows of the same 5 logits at T = 0.7 (the interpreter runs about 10 ms a row)
    small = torch.tensor([1.0, 0.0, -0.5, 2.0, 0.3], device=device).repeat(1000, 1)
    draws = sample_tokens_fused(small, warm, torch.Generator(device=device).manual_seed(1))[0]
    counts = torch.bincount(draws.cpu(), minlength=5).double()
    probs = torch.softmax(small[0].cpu().double() / 0.7, dim=0)
    out["chi2"] = float(((counts - 1000 * probs) ** 2 / (1000 * probs)).sum())
    return out


def engine_greedy(hf_dir: str, ids: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """Greedy responses of the engine with the fused sampler (rows joining mid-way: max_batch 2 for 4 prompts),
    and the response lengths of a call with forced EOS positions inside 4-step decode windows."""
    engine, model = build_engine(hf_dir, 1, NEVER, max_batch=2, sampler="fused", sync_every=4)
    model.fused_inference = False  # only the sampler in the interpreter
    greedy = engine.generate(ids, max_new_tokens=6, temperature=0.0).responses()
    engine, model = build_engine(hf_dir, 1, 3, max_batch=2, sampler="fused", sync_every=4)  # EOS: a real id
    model.fused_inference = False
    # greedy: these prompts' greedy responses hold no token 3 in 12 tokens, so only the forced EOS ends a row,
    # whatever the sampler's random stream (a sampled call can draw the real EOS id earlier)
    forced = engine.generate(ids, max_new_tokens=12, temperature=0.0, eos_at=[3, 6, 9, 12],
                             ignore_eos=True).responses()
    return greedy, [len(r) for r in forced]


def test_fused_sampler_matches_sample_tokens(hf_dir):
    ids = tokenize(hf_dir, TEXT_PROMPTS)
    engine, _ = build_engine(hf_dir, 1, NEVER, max_batch=2)
    reference = engine.generate(ids, max_new_tokens=6, temperature=0.0).responses()
    code = ("import json, sys; sys.path.insert(0, %r); import test_fused_sampling as t; "
            "print(json.dumps([t.sampler_checks('cpu'), t.engine_greedy(%r, %r)]))" % (HERE, hf_dir, ids))
    env = child_env(HERE, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    checks, (tokens, forced_lengths) = json.loads(out.stdout.strip().splitlines()[-1])
    runs = [checks] + ([sampler_checks("cuda")] if torch.cuda.is_available() else [])
    for c in runs:
        assert c["greedy_equal"] and c["forced_kept"] and c["masked_never_drawn"] and c["same_seed_same_tokens"], c
        assert c["bf16_as_float32"], c
        assert c["split_same_tokens"], c
        # both log-sum-exps of the same float32 logits, summed in other orders: a few float32 ulps of |lse| ~ 10
        assert c["greedy_logprob_error"] < 1e-5 and c["sampled_logprob_error"] < 1e-5, c
        assert c["split_logprob_error"] < 1e-5, c
        assert c["chi2"] < CHI2_4DOF_1E4, c
    assert tokens == reference
    assert forced_lengths == [3, 6, 9, 12]  # forced ids read per row from the staged window (were misread)
