"""The decode GEMMs of one shape, timed per row count under each BLAS library torch can use (cuBLAS, cuBLASLt).

A decode step of the generation engine runs, per layer, the stacked q/k/v projection, o_proj, the stacked
gate/up projection and down_proj, then the LM head once: `F.linear` on [rows, hidden] activations. This
times those GEMMs at the row counts a rollout runs (the engine's CUDA-graph buckets), each inside a captured
CUDA graph of REPEAT calls as the engine replays them, and reports per row count: microseconds per decode
step's GEMMs, TFLOP/s, and the fraction of the GEMM roofline (per GEMM the longer of its weight + activation
bytes at the card's bandwidth and its FLOPs at the dense bf16 peak). Use: which library (and which bucket
granularity) the decode graphs should be captured with. With --train-shape it also times a training
micro-batch's GEMMs (forward, dgrad, wgrad) per library.

    python3 benchmarks/gemm_shapes.py --shape qwen2.5-7b [--rows 8,16,...] [--out gemm.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.generation import SHAPES  # noqa: E402
from benchmarks.gpu_specs import blas_library, peak_flops, spec_bandwidth  # noqa: E402

REPEAT = 20  # GEMM calls per captured graph
LIBRARIES = ("cublas", "cublaslt")


def decode_gemms(shape: dict) -> dict[str, tuple[int, int, int]]:
    """name -> (out_features, in_features, calls per decode step) of `shape`'s decode GEMMs."""
    h, layers, i = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    d = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * d
    return {"qkv": (h + 2 * kv, h, layers), "o": (h, h, layers), "gate_up": (2 * i, h, layers),
            "down": (h, i, layers), "lm_head": (shape["vocab_size"], h, 1)}


def time_gemm(rows: int, n: int, k: int, reps: int, kind: str = "forward") -> float:
    """Seconds per bf16 GEMM of a linear layer with weight [n, k] on `rows` tokens, replayed from a captured graph
    of REPEAT calls. kind: "forward" F.linear(x [rows, k]) | "dgrad" dy [rows, n] @ w | "wgrad" dy^T @ x."""
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    dy = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    gemm = {"forward": lambda: F.linear(x, w), "dgrad": lambda: dy @ w, "wgrad": lambda: dy.t() @ x}[kind]
    out = gemm()  # warm-up outside capture: the library picks and loads its kernel here
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            out = gemm()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPEAT):
            out = gemm()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    del graph, out
    return start.elapsed_time(end) / 1e3 / (reps * REPEAT)


def train_gemms(shape: str, tokens: int, reps: int, peak: float | None) -> dict:
    """A training micro-batch's GEMMs at `shape` (every layer's forward, dgrad and wgrad; the LM head's on every
    token, an upper bound) per library: seconds and TFLOP/s."""
    gemms = decode_gemms(SHAPES[shape])
    flops = 3 * sum(2 * tokens * n * k * calls for n, k, calls in gemms.values())
    out = {"shape": shape, "tokens": tokens}
    for lib in LIBRARIES:
        with blas_library(lib):
            per = {f"{g}.{kind}": time_gemm(tokens, n, k, reps, kind) for g, (n, k, _) in gemms.items()
                   for kind in ("forward", "dgrad", "wgrad")}
        total = sum(t * gemms[name.split(".")[0]][2] for name, t in per.items())
        out[lib] = {"seconds": total, "tflops": flops / total / 1e12,
                    "mfu": flops / total / peak if peak else None, "per_gemm_us": {g: t * 1e6 for g, t in per.items()}}
        print(f"{shape} training micro-batch of {tokens} tokens, {lib}: {total * 1e3:.1f} ms of GEMMs, "
              f"{out[lib]['tflops']:.0f} TFLOP/s", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="qwen2.5-7b", choices=[s for s in SHAPES if s != "tiny"])
    p.add_argument("--rows", default="8,16,32,64,96,128,192,256,264,272,320,384,448,512")
    p.add_argument("--reps", type=int, default=10, help="graph replays per timing")
    p.add_argument("--train-shape", default="qwen2.5-1.5b", help="also time this shape's training GEMMs ('' = skip)")
    p.add_argument("--train-tokens", type=int, default=8192, help="tokens per training micro-batch")
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    name = torch.cuda.get_device_name()
    bandwidth = spec_bandwidth(name)
    peak = peak_flops(name)
    gemms = decode_gemms(SHAPES[args.shape])
    report = {"device": name, "shape": args.shape, "torch": torch.__version__, "rows": {}}
    for rows in [int(r) for r in args.rows.split(",")]:
        entry = report["rows"][rows] = {}
        flops = sum(2 * rows * n * k * calls for n, k, calls in gemms.values())
        roofline = None
        if bandwidth and peak:
            roofline = sum(calls * max(2 * (n * k + rows * (n + k)) / bandwidth, 2 * rows * n * k / peak)
                           for n, k, calls in gemms.values())
        for lib in LIBRARIES:
            with blas_library(lib):
                per = {g: time_gemm(rows, n, k, args.reps) for g, (n, k, _) in gemms.items()}
            step = sum(per[g] * gemms[g][2] for g in gemms)
            entry[lib] = {"step_us": step * 1e6, "tflops": flops / step / 1e12,
                          "of_roofline": roofline / step if roofline else None,
                          "per_gemm_us": {g: t * 1e6 for g, t in per.items()}}
        entry["roofline_us"] = roofline * 1e6 if roofline else None
        line = "  ".join(f"{lib} {entry[lib]['step_us']:8.0f} us ({entry[lib]['tflops']:5.0f} TFLOP/s"
                         + (f", {entry[lib]['of_roofline']:.0%} of roofline)" if roofline else ")")
                         for lib in LIBRARIES)
        print(f"{args.shape} rows {rows:4d}: {line}", flush=True)
    if args.train_shape:
        report["train"] = train_gemms(args.train_shape, args.train_tokens, args.reps, peak)
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
