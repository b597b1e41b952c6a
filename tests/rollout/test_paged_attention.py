"""The Triton paged decode-attention kernel against the gather + SDPA path, alone and inside the engine
(greedy tokens equal transformers' with rows joining mid-way).

On CPU the kernel runs in the Triton interpreter, which must be switched on before triton is first
imported: the checks run in a fresh subprocess with TRITON_INTERPRET=1 (with CUDA, in this process).

Tolerance: 1e-5 (fp32): the kernel's online softmax and SDPA sum the same products in different
orders; observed differences are ~5e-7 on outputs of magnitude ~1.
"""

import json
import os
import subprocess
import sys

import torch

from rollout_refs import NEVER, TEXT_PROMPTS, hf_greedy, tokenize

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def kernel_errors() -> list[float]:
    """Max |kernel - reference| over head layouts (GQA 2:1, 7:1, MHA) and rows ending at block edges."""
    from verl_mega.rollout.paged_attention import paged_decode_attention, paged_decode_attention_reference

    errors = []
    for hq, hkv, d, block in [(4, 2, 16, 4), (14, 2, 64, 16), (3, 3, 8, 8)]:
        gen = torch.Generator().manual_seed(hq * 100 + d)
        rows, pool_blocks, nb = 5, 20, 4
        k_pool, v_pool = (torch.randn(pool_blocks * block, hkv, d, generator=gen) for _ in range(2))
        q = torch.randn(rows, hq, 1, d, generator=gen)[:, :, 0]  # non-contiguous, as the decoder passes it
        tables = torch.randint(1, pool_blocks, (rows, nb), generator=gen)
        positions = torch.tensor([0, block - 1, block, nb * block - 1, 2 * block + 1])  # block edges
        got = paged_decode_attention(q, k_pool, v_pool, tables, positions, block)
        ref = paged_decode_attention_reference(q, k_pool, v_pool, tables, positions, block)
        errors.append(float((got - ref).abs().max()))
    return errors


def engine_tokens(hf_dir: str, ids: list[list[int]], eos: int) -> list[list[int]]:
    """Greedy responses of the engine with the paged kernel, 2 rows for 4 requests."""
    from rollout_refs import build_engine

    engine, model = build_engine(hf_dir, 1, eos, max_batch=2, attention="paged")
    model.fused_inference = False  # only the paged kernel in the interpreter, not the fused decoder ops
    return engine.generate(ids, max_new_tokens=8, temperature=0.0).responses()


def test_paged_kernel_matches_gather_path_and_transformers(hf_dir):
    ids = tokenize(hf_dir, TEXT_PROMPTS)
    eos = hf_greedy(hf_dir, ids, NEVER, 8)[0][3]
    ref = hf_greedy(hf_dir, ids, eos, 8)
    if torch.cuda.is_available():
        errors, tokens = kernel_errors(), engine_tokens(hf_dir, ids, eos)
    else:
        code = ("import json, sys; sys.path.insert(0, %r); import test_paged_attention as t; "
                "print(json.dumps([t.kernel_errors(), t.engine_tokens(%r, %r, %d)]))" % (HERE, hf_dir, ids, eos))
        env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([ROOT, HERE])}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        errors, tokens = json.loads(out.stdout.strip().splitlines()[-1])
    assert max(errors) < 1e-5, errors
    assert tokens == ref
