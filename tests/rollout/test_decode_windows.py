"""A decode window run as one CUDA graph (`EngineConfig.cuda_graph_window`: sync_every steps with their fused
sampling) gives the same tokens and log-probs as the per-step path (a graph per step, sampling eager): both draw
the window's seeds at once, so sampled rows match too, with rows joining mid-way (max_batch 3 for 8 rows),
forced EOS inside windows and greedy rows.

On CPU the window runs eagerly, the fused sampler in the Triton interpreter (a fresh subprocess with
TRITON_INTERPRET=1); with CUDA the same comparison runs in this process with real graphs, and checks that window
graphs were captured and replayed.
"""

import json
import os
import subprocess
import sys

import torch

from tests.run_python import child_env
from rollout_refs import TEXT_PROMPTS, build_engine, tokenize

HERE = os.path.dirname(os.path.abspath(__file__))


def window_runs(hf_dir: str, ids: list[list[int]], device: str) -> dict:
    """{"on" | "off": (sampled tokens, sampled log-probs, greedy tokens, window graphs captured)} for
    cuda_graph_window on and off; fp32 model on `device`."""
    out = {}
    for name, window in (("on", True), ("off", False)):
        engine, model = build_engine(hf_dir, 1, 3, max_batch=3, device=device, sampler="fused", sync_every=4,
                                     cuda_graph_window=window)
        model.fused_inference = False  # only the sampler in the interpreter
        sampled = engine.generate(ids, max_new_tokens=10, temperature=1.0, n=2, seed=7,
                                  eos_at=[3, 10, 5, 1, 8, 2, 7, 4], ignore_eos=True)  # only the forced EOS ends a row
        greedy = engine.generate(ids, max_new_tokens=6, temperature=0.0, seed=7)
        windows = sum(1 for key in engine._graphs if key[0] == "window")
        out[name] = (sampled.responses(), sampled.response_logprobs.tolist(), greedy.responses(), windows)
    return out


def check(runs: dict, graphs: bool) -> None:
    on, off = runs["on"], runs["off"]
    assert on[0] == off[0] and on[2] == off[2]  # the same sampled and greedy tokens
    assert [len(r) for r in on[0]] == [3, 10, 5, 1, 8, 2, 7, 4]
    # the same kernels on the same rows' logits (vocabulary of one sampler block: no split of the sums): equal
    assert on[1] == off[1]
    assert (on[3] > 0) == graphs and off[3] == 0  # window graphs only where CUDA graphs run, only when asked for


def test_window_graph_matches_per_step_path(hf_dir):
    ids = tokenize(hf_dir, TEXT_PROMPTS)
    code = ("import json, sys; sys.path.insert(0, %r); import test_decode_windows as t; "
            "print(json.dumps(t.window_runs(%r, %r, 'cpu')))" % (HERE, hf_dir, ids))
    env = child_env(HERE, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    check(json.loads(out.stdout.strip().splitlines()[-1]), graphs=False)
    if torch.cuda.is_available():
        check(window_runs(hf_dir, ids, "cuda"), graphs=True)
