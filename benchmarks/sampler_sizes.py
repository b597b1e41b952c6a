"""The one-pass Triton sampler over a decode run's batch sizes: binaries compiled, and microseconds per call.

The rollout engine samples each decode step's rows with `rollout/fused_sampling.py`; the row count falls as
sequences finish and rises as others join (CUDA-graph buckets: multiples of 16). A sampler whose compiled
binaries follow the row count (its vocabulary split count was a compile-time constant) compiles new ones the
first time a run meets a size, inside a measured rollout. This times a "first pass" over every bucket from
--max-rows down to 16 (the compiles it pays, the wall time) and then each of --sizes alone (device time per call:
the median of --reps replays of a CUDA graph of 20 calls, as the engine's decode windows run it), for the current
sampler and, in the same process, a baseline version of the module (--baseline: a copy of another revision's
fused_sampling.py, e.g. `git show REV:verl_mega/rollout/fused_sampling.py > old.py`).
Logits are the LM head's bf16 [B, --vocab] (Qwen2.5's padded vocabulary by default), temperature 1, the
forced-token column the engine passes (-1: sample), a seed slice of a window's seed buffer.

    python3 benchmarks/sampler_sizes.py --baseline /tmp/old_fused_sampling.py --out-dir results
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.generation import graph_seconds  # noqa: E402
from benchmarks.step_probes import TritonCompiles  # noqa: E402
from verl_mega.rollout import fused_sampling  # noqa: E402
from verl_mega.rollout.sampling import SamplingParams  # noqa: E402


GRAPH_CALLS = 20  # sampler calls per timed CUDA graph


def load_module(path: str):
    """A fused_sampling module from a file (its kernels decorated apart from the current module's)."""
    spec = importlib.util.spec_from_file_location("baseline_fused_sampling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def call_inputs(rows: int, vocab: int, device, seed_offset: int) -> tuple:
    g = torch.Generator(device=device).manual_seed(rows)
    logits = torch.randn(rows, vocab, generator=g, device=device).bfloat16()
    forced = torch.full((rows, 4), -1, dtype=torch.long, device=device)[:, seed_offset % 4]
    seeds = torch.randint(0, 2**31 - 1, (16,), generator=g, device=device)
    return logits, forced, seeds[seed_offset % 16:seed_offset % 16 + 1]


def first_pass(module, args, device) -> dict:
    """Every decode bucket from --max-rows down to 16 once (compiles met, wall s), then again (wall s)."""
    params = SamplingParams(temperature=1.0)
    buckets = list(range(args.max_rows, 0, -16))
    inputs = {b: call_inputs(b, args.vocab, device, i) for i, b in enumerate(buckets)}
    passes = []
    for _ in range(2):
        torch.cuda.synchronize()
        with TritonCompiles() as compiles:
            start = time.perf_counter()
            for b in buckets:
                logits, forced, seed = inputs[b]
                module.sample_tokens_fused(logits, params, forced=forced, seed=seed)
            torch.cuda.synchronize()
        passes.append((time.perf_counter() - start, compiles.names))
    return {"compiles_first_pass": len(passes[0][1]), "compiled": sorted(set(passes[0][1])),
            "first_pass_s": passes[0][0], "second_pass_s": passes[1][0]}


def per_call_us(module, args, device) -> dict[int, float]:
    """Device microseconds per call at each of --sizes: GRAPH_CALLS calls in one CUDA graph (as the engine's
    decode windows run them), the median of --reps replays."""
    params = SamplingParams(temperature=1.0)
    out = {}
    for b in args.sizes:
        logits, forced, seed = call_inputs(b, args.vocab, device, 0)
        for _ in range(3):
            module.sample_tokens_fused(logits, params, forced=forced, seed=seed)
        torch.cuda.synchronize()
        out[b] = 1e6 * graph_seconds(lambda: module.sample_tokens_fused(logits, params, forced=forced, seed=seed),
                                     GRAPH_CALLS, args.reps)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", required=True, help="a fused_sampling.py of another revision")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--max-rows", type=int, default=512)
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[16, 32, 64, 128, 256, 512])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--programs-per-sm", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                   help="also time the current sampler with vocab_splits at these depths, e.g. 2,4,8,16")
    p.add_argument("--out-dir", default="results")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sampler_sizes.py times the compiled Triton sampler: it needs a CUDA device")
    device = torch.device("cuda")
    runs = {}
    for name, module in (("baseline", load_module(args.baseline)), ("current", fused_sampling)):
        runs[name] = {**first_pass(module, args, device), "us_per_call": per_call_us(module, args, device)}
    default = fused_sampling.PROGRAMS_PER_SM
    sweep = {}  # the current sampler at other vocabulary-split depths (vocab_splits' programs per SM)
    for depth in args.programs_per_sm:
        fused_sampling.PROGRAMS_PER_SM = depth
        sweep[depth] = per_call_us(fused_sampling, args, device)
    fused_sampling.PROGRAMS_PER_SM = default
    report = {"machine": torch.cuda.get_device_name(), "vocab": args.vocab, "max_rows": args.max_rows,
              "baseline_file": args.baseline, **runs, "programs_per_sm_default": default,
              "programs_per_sm_sweep_us": sweep}
    lines = [f"# Fused sampler over decode batch sizes ({report['machine']}, vocab {args.vocab}, bf16 logits)", "",
             "| | compiles in the first pass | first pass s | second pass s |", "|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['compiles_first_pass']} | {r['first_pass_s']:.3f} | {r['second_pass_s']:.4f} |")
    lines += ["", "| rows | baseline us | current us | current / baseline |", "|---|---|---|---|"]
    for b in args.sizes:
        base, cur = runs["baseline"]["us_per_call"][b], runs["current"]["us_per_call"][b]
        lines.append(f"| {b} | {base:.1f} | {cur:.1f} | {cur / base:.3f} |")
    if sweep:
        lines += ["", f"Current sampler, us per call (logits read at GB/s) by programs per SM (default {default}):", "",
                  "| rows | " + " | ".join(str(d) for d in sweep) + " |", "|---|" + "---|" * len(sweep)]
        for b in args.sizes:
            cells = [f"{sweep[d][b]:.1f} ({b * args.vocab * 2 / sweep[d][b] / 1e3:.0f})" for d in sweep]
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "sampler_sizes.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out_dir, "sampler_sizes.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
