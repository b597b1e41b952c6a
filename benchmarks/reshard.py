"""HybridEngine resharding benchmark: training layout -> generation layout on real shapes.

Run (2 GPUs, NCCL, bf16):   torchrun --nproc_per_node 2 benchmarks/reshard.py
CPU check (gloo, tiny):     torchrun --nproc_per_node 2 benchmarks/reshard.py --device cpu --tiny

For each model shape (1.5B-like: hidden 1536, 28 layers, 12/2 heads, inter 8960, vocab 151936, tied;
7B-like: hidden 3584, 28 layers, 28/4 heads, inter 18944, vocab 152064; 8B = Llama-3.1-8B: hidden 4096, 32 layers,
32/8 heads, inter 14336, vocab 128256) and each transition over the W ranks (tp=W -> tp_g=1, and pp=W -> pp_g=1
i.e. tp=1 -> tp_g=1; `--tps 2,4,8` / `--pps 2` instead: those sizes, dp = W / size; a tp that does not divide a
shape's heads, e.g. 4 for the 1.5B's 2 KV heads, is listed as skipped), with random weights drawn directly on
the device (no HF directory), it times (median of --reps after --warmup, slowest rank per rep):
- `hybrid`: HybridEngine.to_inference() with its defaults (`--bucket-mb`): for tp -> tp_g < tp the
  direct path (per-tensor all-gathers straight into the inference weights, one grouped NCCL launch per
  bucket, only dim-1 tensors re-assembled); for pp -> 1 the packed path (pack + bucketed all-gathers
  in the micro-DP group, pipelined with the assembly); the same with one bucket (the paper's single
  all-gather / one grouped launch), and `packed`: the packed path forced (direct=False; equal to
  `hybrid` where the direct path does not apply),
- `allgather`: one plain all-gather of the same bytes per rank (the communication floor),
- `naive`: the DeepSpeed-Chat-style gather-everything baseline (NaiveGatherEngine, world group),
and reports ratio hybrid/allgather (target <= 1.5), bytes received vs the paper's analytic volume,
(the inference weights are first checked against all training shards by per-tensor sums),
redundant weight memory and peak memory (torch.cuda.max_memory_allocated, reset before each phase).
Writes $OUT/reshard.json and $OUT/reshard.md (with the GPU name) when $OUT is set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from verl_mega.hybrid_engine.comm import all_gather_flat
from verl_mega.hybrid_engine.reshard import DEFAULT_BUCKET_MB, HybridEngine, NaiveGatherEngine
from verl_mega.models.config import ModelConfig
from verl_mega.models.parallelize import build_stage
from verl_mega.parallel.dist import init_distributed
from verl_mega.parallel.layout import Layout

QWEN2 = dict(attention_bias=True, model_type="qwen2")
SHAPES = {
    "1.5B": dict(QWEN2, hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960,
                 vocab_size=151936, tie_word_embeddings=True),
    "7B": dict(QWEN2, hidden_size=3584, num_layers=28, num_heads=28, num_kv_heads=4, intermediate_size=18944,
               vocab_size=152064, tie_word_embeddings=False),
    # Llama-3.1-8B: 8 KV heads, so the one shape here that splits over tp = 8
    "8B": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_size=14336,
               vocab_size=128256, tie_word_embeddings=False, attention_bias=False, model_type="llama"),
}
TINY = {"tiny": dict(QWEN2, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=128,
                     vocab_size=1000, tie_word_embeddings=False)}


def model_config(shape: dict) -> ModelConfig:
    return ModelConfig(head_dim=shape["hidden_size"] // shape["num_heads"], **shape)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def slowest(seconds: float, device: torch.device) -> float:
    """The slowest rank's time (the transition ends when every rank is done)."""
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def random_stage(config: ModelConfig, layout: Layout, dtype: torch.dtype, device: torch.device):
    """This rank's training stage with N(0, 0.02) weights drawn on the device (replicated tensors equal
    over the TP ranks of a stage, every tensor equal over the dp replicas, as in a real model)."""
    stage = build_stage(config, layout, params_dtype=dtype, device=device, init_seed=None)
    sharded = torch.Generator(device=device).manual_seed(1234 + 1000 * layout.pp_rank + layout.tp_rank)
    replicated = torch.Generator(device=device).manual_seed(4321 + layout.pp_rank)
    with torch.no_grad():
        for p in stage.parameters():
            p.normal_(0.0, 0.02, generator=sharded if getattr(p, "tensor_model_parallel", False) else replicated)
    return stage.requires_grad_(False)


def verify(engine: HybridEngine, stage, layout: Layout) -> None:
    """Check the inference weights (tp_g = 1: full tensors) against the training shards of all ranks
    by per-tensor float64 sums; raises AssertionError on a mismatch (a wrong resharding on this device)."""
    mine = {stage.hf_name(n): (p.double().sum().item(), getattr(p, "tensor_model_parallel", False))
            for n, p in stage.named_parameters()}
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, (layout.tp_rank, mine))
    expected: dict[str, dict[int, float]] = {}
    for tp_rank, sums in ranks:
        for name, (total, sharded) in sums.items():
            expected.setdefault(name, {}).setdefault(tp_rank if sharded else 0, total)
    model = engine.to_inference()
    for name, param in model.named_parameters():
        want, got = sum(expected[model.hf_name(name)].values()), param.double().sum().item()
        assert abs(got - want) <= 1e-6 * abs(want) + 1e-3, f"{name}: inference sum {got} != training {want}"
    engine.to_train()


def time_engine(engine: HybridEngine, reps: int, warmup: int, device: torch.device) -> dict:
    """Median slowest-rank to_inference() time, its stats and peak memory (to_train() after each rep)."""
    times, peak = [], None
    for i in range(warmup + reps):
        dist.barrier()
        reset_peak(device)
        engine.to_inference()
        stats = engine.last_stats
        peak = peak_gb(device)
        engine.to_train()
        if i >= warmup:
            times.append(slowest(stats.seconds, device))
    return {"seconds": statistics.median(times), "peak_gb": peak, "bytes_moved": stats.bytes_moved,
            "bytes_gathered": stats.bytes_gathered, "redundant_bytes": stats.redundant_bytes,
            "analytic_bytes": stats.analytic_bytes, "model_bytes": stats.model_bytes,
            "num_collectives": stats.num_collectives, "tensors_gathered": stats.tensors_gathered,
            "direct": engine._direct}


def time_allgather(numel: int, group, reps: int, warmup: int, dtype: torch.dtype, device: torch.device) -> dict:
    """One plain all-gather of `numel` elements per rank over `group` (buffer allocated each rep, like the engine)."""
    times, peak, size = [], None, group.size()
    for i in range(warmup + reps):
        dist.barrier()
        reset_peak(device)
        sync(device)
        start = time.perf_counter()
        out = torch.empty(size * numel, dtype=dtype, device=device)
        me = dist.get_rank(group)
        all_gather_flat(out, out[me * numel:(me + 1) * numel], group)  # in place, as the engine does
        sync(device)
        elapsed = time.perf_counter() - start
        peak = peak_gb(device)
        del out
        if i >= warmup:
            times.append(slowest(elapsed, device))
    return {"seconds": statistics.median(times), "peak_gb": peak,
            "bytes_moved": (size - 1) * numel * dtype.itemsize}


def run_case(name: str, shape: dict, tp: int, pp: int, args, dtype: torch.dtype, device: torch.device) -> dict:
    config = model_config(shape)
    layout = Layout.create(tp=tp, pp=pp)
    stage = random_stage(config, layout, dtype, device)
    train_gb = sum(p.numel() * p.element_size() for p in stage.parameters()) / 2**30
    engine = HybridEngine(stage, layout, config, tp_g=1, bucket_mb=args.bucket_mb)
    inf_layout = engine.inference_layout
    verify(engine, stage, layout)
    hybrid = time_engine(engine, args.reps, args.warmup, device)
    plain = time_allgather(engine.chunk_numel, engine.gather_group, args.reps, args.warmup, dtype, device)
    del engine
    gc.collect()
    engine = HybridEngine(stage, layout, config, tp_g=1, bucket_mb=None, inference_layout=inf_layout)
    single = time_engine(engine, args.reps, args.warmup, device)  # the paper's single all-gather
    del engine
    gc.collect()
    engine = HybridEngine(stage, layout, config, tp_g=1, bucket_mb=args.bucket_mb, inference_layout=inf_layout,
                          direct=False)
    packed = time_engine(engine, args.reps, args.warmup, device)  # the pack + assemble path
    del engine
    gc.collect()
    naive = time_engine(NaiveGatherEngine(stage, layout, config, tp_g=1, bucket_mb=args.bucket_mb,
                                          inference_layout=inf_layout), args.reps, args.warmup, device)
    del stage
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"model": name, "transition": f"tp={tp},pp={pp} -> tp_g=1,pp_g=1", "train_shard_gb": train_gb,
            "verified": True,
            "bucket_mb": args.bucket_mb, "hybrid": hybrid, "hybrid_single_allgather": single,
            "allgather": plain, "naive": naive, "packed": packed,
            "ratio_hybrid_over_allgather": hybrid["seconds"] / plain["seconds"],
            "ratio_single_over_allgather": single["seconds"] / plain["seconds"],
            "ratio_packed_over_allgather": packed["seconds"] / plain["seconds"],
            "ratio_naive_over_allgather": naive["seconds"] / plain["seconds"]}


def sizes(text: str | None, world: int, flag: str) -> list[int]:
    """--tps / --pps: [world] by default, [] for '0', else the listed sizes (each must divide the world size)."""
    if text is None:
        return [world]
    values = [int(v) for v in text.split(",")]
    if values == [0]:
        return []
    bad = [v for v in values if v < 1 or world % v]
    if bad:
        raise ValueError(f"{flag} {text}: {bad} do not divide the {world} ranks")
    return values


def markdown(report: dict) -> str:
    mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
    mem = lambda x: "-" if x is None else f"{x:.1f}"  # noqa: E731
    lines = [f"## Reshard benchmark ({report['device']}, {report['backend']}, {report['dtype']}, "
             f"{report['world_size']} ranks, median of {report['reps']})", "",
             "| model | transition | path | hybrid ms | all-gather ms | ratio | 1-bucket ms (ratio) "
             "| packed ms (ratio) | naive ms "
             "| recv MiB (analytic) | redundant MiB hybrid / naive | peak GiB hybrid / 1-bucket / all-gather / naive |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        if "skipped" in r:
            lines.append(f"| {r['model']} | {r['transition']} | skipped: {r['skipped']} |" + " |" * 9)
            continue
        h, s, a, n, p = r["hybrid"], r["hybrid_single_allgather"], r["allgather"], r["naive"], r["packed"]
        lines.append(
            f"| {r['model']} | {r['transition']} | {'direct' if h['direct'] else 'packed'} "
            f"| {h['seconds'] * 1e3:.1f} | {a['seconds'] * 1e3:.1f} "
            f"| {r['ratio_hybrid_over_allgather']:.2f} | {s['seconds'] * 1e3:.1f} "
            f"({r['ratio_single_over_allgather']:.2f}) | {p['seconds'] * 1e3:.1f} "
            f"({r['ratio_packed_over_allgather']:.2f}) | {n['seconds'] * 1e3:.1f} "
            f"| {mib(h['bytes_moved'])} ({mib(h['analytic_bytes'])}) "
            f"| {mib(h['redundant_bytes'])} / {mib(n['redundant_bytes'])} "
            f"| {mem(h['peak_gb'])} / {mem(s['peak_gb'])} / {mem(a['peak_gb'])} / {mem(n['peak_gb'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="default bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU check)")
    parser.add_argument("--models", default=None, help="comma-separated subset of 1.5B,7B,8B")
    parser.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_MB,
                        help="HybridEngine bucket size per rank (MiB); the 1-bucket column is always measured too")
    parser.add_argument("--tps", default=None, help="comma-separated training tp sizes to regather to tp_g = 1 "
                                                    "(dp = ranks / tp; default: all ranks; 0 = none)")
    parser.add_argument("--pps", default=None, help="comma-separated training pp sizes to regather to one stage "
                                                    "(default: all ranks; 0 = none)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    init_distributed(backend="nccl" if args.device == "cuda" else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    world = dist.get_world_size()
    shapes = TINY if args.tiny else {k: SHAPES[k] for k in (args.models.split(",") if args.models else SHAPES)}
    results = []
    cases = [(tp, 1) for tp in sizes(args.tps, world, "--tps")] + [(1, pp) for pp in sizes(args.pps, world, "--pps")]
    for name, shape in shapes.items():
        for tp, pp in cases:
            try:  # a shape whose heads do not split over tp (e.g. 2 KV heads at tp 4) is reported, not run
                model_config(shape).check_tp(tp)
            except ValueError as exc:
                results.append({"model": name, "transition": f"tp={tp},pp={pp} -> tp_g=1,pp_g=1", "skipped": str(exc)})
            else:
                results.append(run_case(name, shape, tp, pp, args, dtype, device))
            if dist.get_rank() == 0:
                print(json.dumps(results[-1]), flush=True)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "backend": dist.get_backend(), "dtype": str(dtype).replace("torch.", ""), "world_size": world,
              "reps": args.reps, "warmup": args.warmup, "torch": torch.__version__, "results": results}
    if dist.get_rank() == 0:
        table = markdown(report)
        print(table, flush=True)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "reshard.json"), "w") as f:
                json.dump(report, f, indent=2)
            with open(os.path.join(os.environ["OUT"], "reshard.md"), "w") as f:
                f.write(table)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
