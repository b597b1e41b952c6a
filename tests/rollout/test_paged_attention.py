"""The Triton paged decode-attention kernel against the gather + SDPA path, alone and inside the engine
(greedy tokens equal transformers' with rows joining mid-way), also at tp 2 with the one-pass sampler (the
engine's CUDA defaults: both ranks draw the same tokens, log-probs equal a teacher-forced forward).

The Triton interpreter must be switched on before triton is first imported: the CPU checks run in a
fresh subprocess with TRITON_INTERPRET=1; with CUDA, the compiled kernel is checked in this process too.

Tolerances: `kernel_errors` (fp32 1e-5; bf16 on CUDA, derived there).
"""

import json
import os
import subprocess
import sys

import torch

from tests.run_python import child_env
from rollout_refs import NEVER, TEXT_PROMPTS, hf_greedy, tokenize
from verl_mega.testing.multiprocess import run_distributed

HERE = os.path.dirname(os.path.abspath(__file__))


def kernel_errors(device: str) -> list[tuple[float, float]]:
    """(max |kernel - reference|, tolerance) over head layouts (GQA 2:1, 7:1, MHA; head_dim 8 padded to 16), rows
    ending at block and tile edges, contexts of one tile and of several (split over programs: `num_splits` gives
    2 off CUDA); on CUDA also in bf16. device: "cuda" (compiled kernel) or "cpu" (the interpreter)."""
    from verl_mega.rollout.paged_attention import TILE, paged_decode_attention, paged_decode_attention_reference

    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cuda" else [])
    errors = []
    for dtype in dtypes:
        for hq, hkv, d, block, nb in [(4, 2, 16, 4, 4), (14, 2, 64, 16, 10), (3, 3, 8, 8, 20)]:
            gen = torch.Generator().manual_seed(hq * 100 + d)
            pool_blocks = 2 * nb
            k_pool, v_pool = (torch.randn(pool_blocks * block, hkv, d, generator=gen) for _ in range(2))
            positions = torch.tensor([0, block - 1, block, nb * block - 1, 2 * block + 1, min(TILE, nb * block - 1)])
            q = torch.randn(len(positions), hq, 1, d, generator=gen)  # [:, :, 0] below: non-contiguous, as in decode
            tables = torch.randint(1, pool_blocks, (len(positions), nb), generator=gen)
            args = [t.to(device) for t in (q, k_pool, v_pool)]
            args = [t.to(dtype) for t in args] + [tables.to(device), positions.to(device)]
            args[0] = args[0][:, :, 0]
            got = paged_decode_attention(*args, block).float()
            ref = paged_decode_attention_reference(*[t.float() if t.is_floating_point() else t for t in args], block)
            # fp32: the online softmax and SDPA sum the same products in other orders (observed ~5e-7);
            # bf16: the outputs (convex combinations of V) are stored in bf16 and the kernel feeds P to its
            # second dot in bf16: each a relative 2^-8 of max |v|
            tol = 1e-5 if dtype == torch.float32 else 2 * 2.0**-8 * float(v_pool.abs().max())
            errors.append((float((got - ref).abs().max()), tol))
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
    # the CPU model in the interpreter (always), and the compiled kernel on CUDA tensors where there is CUDA
    code = ("import json, sys; sys.path.insert(0, %r); import test_paged_attention as t; "
            "print(json.dumps([t.kernel_errors('cpu'), t.engine_tokens(%r, %r, %d)]))" % (HERE, hf_dir, ids, eos))
    env = child_env(HERE, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    errors, tokens = json.loads(out.stdout.strip().splitlines()[-1])
    if torch.cuda.is_available():
        errors += kernel_errors("cuda")
    assert all(err < tol for err, tol in errors), errors
    assert tokens == ref


def release_runs(hf_dir: str, ids: list[list[int]], device: str) -> list:
    """Two rollouts of one paged engine with `release()` (the KV cache freed, as between GRPO steps) after each:
    per rollout (sampled tokens, their log-probs, CUDA graphs captured). The first rollout's pools
    are kept alive and filled with NaN, so the second one's pools sit elsewhere and a stale read would show."""
    from rollout_refs import build_engine

    engine, model = build_engine(hf_dir, 1, 3, max_batch=3, device=device, attention="paged", sampler="fused",
                                 sync_every=4)
    model.fused_inference = False  # only the paged kernels and the sampler in the interpreter
    runs, old_pools = [], []
    for _ in range(2):
        captures = engine.stats["graph_captures"]
        sampled = engine.generate(ids, max_new_tokens=4, temperature=1.0, n=2, seed=7)
        runs.append((sampled.responses(), sampled.response_logprobs.tolist(), engine.stats["graph_captures"] - captures))
        old_pools += engine.cache.keys + engine.cache.values
        engine.release()
        for pool in old_pools:
            pool.fill_(float("nan"))
    return runs


def check_release(runs: list, graphs: bool) -> None:
    first, second = runs
    assert first[:2] == second[:2]  # the same tokens and log-probs from the new pools
    assert (first[2] > 0) == graphs and second[2] == 0  # no graph captured again after the release


def test_decode_graphs_survive_a_cache_release(hf_dir):
    """The paged kernels reach the pools through the cache's address table: after `release()` the next rollout
    allocates new pools and gives the same outputs, and on CUDA replays the graphs of the first rollout (the
    gather path, whose graphs read the pools themselves, drops its graphs)."""
    ids = tokenize(hf_dir, TEXT_PROMPTS[:2])  # 2 prompts x n=2 = 4 rows over max_batch 3: a row still joins mid-way
    code = ("import json, sys; sys.path.insert(0, %r); import test_paged_attention as t; "
            "print(json.dumps(t.release_runs(%r, %r, 'cpu')))" % (HERE, hf_dir, ids))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=child_env(HERE, TRITON_INTERPRET="1"), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    check_release(json.loads(out.stdout.strip().splitlines()[-1]), graphs=False)
    if torch.cuda.is_available():
        from rollout_refs import build_engine

        check_release(release_runs(hf_dir, ids, "cuda"), graphs=True)
        engine, _ = build_engine(hf_dir, 1, 3, device="cuda", attention="gather")
        engine.generate(ids, max_new_tokens=4, temperature=0.0)
        assert engine._graphs
        engine.release()
        assert not engine._graphs


def test_paged_kernel_rejects_what_it_cannot_read():
    """Checked before any Triton work: int32 tables (slot offsets would overflow), GQA groups that do not divide."""
    import pytest

    from verl_mega.rollout.paged_attention import paged_decode_attention

    q, pool = torch.zeros(2, 4, 16), torch.zeros(64, 2, 16)
    positions = torch.tensor([3, 5])
    with pytest.raises(ValueError, match="int64 block tables"):
        paged_decode_attention(q, pool, pool, torch.ones(2, 2, dtype=torch.int32), positions, 16)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_decode_attention(torch.zeros(2, 3, 16), pool, pool, torch.ones(2, 2, dtype=torch.long), positions, 16)
    with pytest.raises(ValueError, match="block_size dividing"):
        paged_decode_attention(q, pool, pool, torch.ones(2, 2, dtype=torch.long), positions, 48)


def _tp2_worker(hf_dir: str, ids: list[list[int]], eos: int) -> dict:
    """One of 2 gloo ranks, kernels in the interpreter: the engine at tp 2 with the paged kernel and the one-pass
    sampler, 2 rows for 4 requests, 3 decode steps per host check."""
    from rollout_refs import build_engine, teacher_forced_logprobs

    engine, model = build_engine(hf_dir, 2, eos, max_batch=2, sync_every=3, attention="paged", sampler="fused")
    model.fused_inference = False
    greedy = engine.generate(ids, max_new_tokens=8, temperature=0.0).responses()
    sampled = engine.generate(ids, max_new_tokens=8, temperature=1.0, n=2, seed=3)
    lp_err = (sampled.response_logprobs - teacher_forced_logprobs(model, sampled, 1.0)).abs().max().item()
    return {"greedy": greedy, "sampled": sampled.responses(), "lp_err": lp_err}


def test_tp2_paged_kernel_and_fused_sampler(hf_dir):
    ids = tokenize(hf_dir, TEXT_PROMPTS)
    eos = hf_greedy(hf_dir, ids, NEVER, 8)[0][3]
    ref = hf_greedy(hf_dir, ids, eos, 8)
    results = run_distributed(_tp2_worker, 2, hf_dir, ids, eos, env={"TRITON_INTERPRET": "1"}, timeout_s=600)
    for r in results:
        assert r["greedy"] == ref
        assert r["lp_err"] < 1e-5  # fp32, test_continuous_batching.py's derivation
    assert results[0]["sampled"] == results[1]["sampled"]
