"""Training throughput of TrainEngine: tokens/s and MFU per layout (tp=2, pp=2, dp=2 on 2 GPUs; 1 GPU).

Run (2 GPUs, NCCL, bf16):   torchrun --nproc_per_node 2 benchmarks/train_throughput.py
CPU check (gloo, tiny):     torchrun --nproc_per_node 2 benchmarks/train_throughput.py --device cpu --tiny

Model: Qwen2.5-0.5B shape (hidden 896, 24 layers, 14 heads / 2 kv heads, head_dim 64, intermediate
4864, vocab 151936, tied embeddings, q/k/v bias) with random weights built directly on the device
(no HF directory). Each step trains the next-token loss on a global batch of 8 x 1024 tokens, split
per dp rank into micro-batches of --micro-batch sequences (1F1B when pp=2), then one AdamW step
(ZeRO-1, fp32 masters, grad clipping). The loss goes through the fused vocab-parallel log-prob
kernel (`--loss fused`, default on CUDA) or the plain-torch one (`--loss torch`).

Layouts: "tp2" (2,1,1), "pp2" (1,2,1), "dp2" (1,1,2) over both ranks, and "single": the same run on
rank 0 alone (a one-rank group; rank 1 waits), i.e. 1 GPU. Timing: --warmup steps, then the mean
of --steps steps (CUDA-synchronised, max over ranks).

MFU = model FLOP/s / (GPUs used x peak). Model FLOPs per token = 6 N (N = parameter count, tied
embedding counted once) + 6 L S d_attn (causal attention score and value matmuls, forward +
backward, S = sequence length, d_attn = heads x head_dim). Peak: the card's dense bf16 figure from
`gpu_specs.PEAK_TFLOPS` (no MFU for a card not listed there); the GPU name is recorded.
Output (rank 0): $OUT/train_throughput.json and .md (or --out).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: benchmarks.*
from benchmarks.gpu_specs import peak_flops  # noqa: E402
from verl_mega.models.config import ModelConfig
from verl_mega.models.parallelize import build_stage
from verl_mega.parallel import Layout
from verl_mega.parallel.dist import init_distributed, new_group
from verl_mega.trainer.engine import TrainEngine, causal_lm_microbatches, next_token_loss
from verl_mega.trainer.optim import OptimConfig

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                  num_kv_heads=2, head_dim=64, rope_theta=1000000.0, tie_word_embeddings=True,
                  attention_bias=True, model_type="qwen2", max_position_embeddings=32768)
TINY = dict(QWEN25_05B, vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
            num_kv_heads=2, head_dim=16)
LAYOUTS = {"tp2": (2, 1, 1), "pp2": (1, 2, 1), "dp2": (1, 1, 2), "single": None}


def param_count(c: ModelConfig) -> int:
    """Parameters of the whole model (true vocab, tied embedding once)."""
    attn = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    attn += (c.num_heads + 2 * c.num_kv_heads) * c.head_dim if c.attention_bias else 0
    layer = attn + 3 * c.hidden_size * c.intermediate_size + 2 * c.hidden_size
    embed = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
    return c.num_layers * layer + embed + c.hidden_size


def flops_per_token(c: ModelConfig, seq: int) -> float:
    """6 N + causal attention matmuls (forward + backward) per token."""
    return 6 * param_count(c) + 6 * c.num_layers * seq * c.num_heads * c.head_dim


def single_rank_layout() -> Layout | None:
    """A (1,1,1) layout on global rank 0 only (collective: every rank creates the group)."""
    group = new_group([0])
    if dist.get_rank() != 0:
        return None
    return Layout(tp=1, pp=1, dp=1, rank=0, tp_rank=0, pp_rank=0, dp_rank=0, tp_group=group, pp_group=group,
                  dp_group=group, mp_group=group, pp_ranks=[0], tp_ranks=[0], dp_ranks=[0])


def make_loss(engine: TrainEngine, kind: str):
    if kind == "torch":
        return next_token_loss(engine)
    from verl_mega.kernels.logprob import fused_logprob_entropy
    model, group = engine.model, engine.layout.tp_group

    def loss_fn(hidden, mb):
        logp, _ = fused_logprob_entropy(hidden, model.output_weight(), mb["labels"], tp_group=group,
                                        vocab_start=model.vocab_start_index, true_vocab_size=model.true_vocab_size,
                                        compute_entropy=False)
        return -(logp * mb["loss_mask"]).sum(), {}
    return loss_fn


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_layout(name: str, args, config: ModelConfig, device: torch.device, peak: float | None) -> dict | None:
    """Build, warm up and time one layout; returns its record on global rank 0 (None elsewhere), with an MFU
    against `peak` (FLOP/s per GPU) when there is one."""
    layout = single_rank_layout() if name == "single" else Layout.create(*LAYOUTS[name])
    if layout is None:
        return None
    dtype = torch.bfloat16
    model = build_stage(config, layout, params_dtype=dtype, device=device, init_seed=0)
    engine = TrainEngine(model, layout, OptimConfig(lr=1e-5, weight_decay=0.01, clip_grad=1.0), param_dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (args.global_batch, args.seq), generator=gen)
    per = args.global_batch // layout.dp
    rows = slice(layout.dp_rank * per, (layout.dp_rank + 1) * per)
    mbs = [{k: v.to(device) for k, v in mb.items()}
           for mb in causal_lm_microbatches(ids[rows], None, per // args.micro_batch)]
    loss_fn = make_loss(engine, args.loss)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        sync(device)
        start = time.perf_counter()
        metrics = engine.forward_backward(mbs, loss_fn)
        stats = engine.optimizer_step()
        sync(device)
        times.append(time.perf_counter() - start)
        losses.append(metrics["loss"])
    timed = torch.tensor([sum(times[args.warmup:]) / args.steps], dtype=torch.float64, device=device)
    if name != "single":  # the 2-rank layouts span the world
        dist.all_reduce(timed, op=dist.ReduceOp.MAX)
    step_s = timed.item()
    gpus = 1 if name == "single" else layout.world_size
    tokens_s = args.global_batch * args.seq / step_s
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    record = {"layout": name, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "gpus": gpus,
              "micro_batches_per_rank": len(mbs), "step_s": step_s, "tokens_per_s": tokens_s,
              "tokens_per_s_per_gpu": tokens_s / gpus, "loss_first": losses[0], "loss_last": losses[-1],
              "grad_norm_last": stats["grad_norm"], "max_mem_gib_rank0": mem}
    if peak:
        record["mfu"] = flops_per_token(config, args.seq) * tokens_s / (gpus * peak)
    del engine, model, mbs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return record if dist.get_rank() == 0 else None


def write(results: list[dict], meta: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "train_throughput.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    mfu_note = (f"MFU against {meta['peak_tflops']:.0f} TFLOP/s dense bf16 per GPU ({meta['flops_formula']})"
                if meta["peak_tflops"] else "no MFU on CPU")
    lines = [f"# Training throughput — {meta['model']}, {meta['device_name']}", "",
             f"Global batch {meta['global_batch']} x {meta['seq']} tokens, micro-batch {meta['micro_batch']} "
             f"sequences, bf16 params + fp32 masters, AdamW (ZeRO-1), loss: {meta['loss']}. "
             f"N = {meta['params'] / 1e6:.1f} M params; {mfu_note}.", "",
             "| layout | tp | pp | dp | GPUs | step (s) | tokens/s | tokens/s/GPU | MFU | max mem rank0 (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        mem = f"{r['max_mem_gib_rank0']:.1f}" if r["max_mem_gib_rank0"] is not None else "n/a"
        lines.append(f"| {r['layout']} | {r['tp']} | {r['pp']} | {r['dp']} | {r['gpus']} | {r['step_s']:.3f} | "
                     f"{r['tokens_per_s']:.0f} | {r['tokens_per_s_per_gpu']:.0f} | {mfu} | {mem} |")
    with open(os.path.join(out_dir, "train_throughput.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny model and batch (CPU check)")
    parser.add_argument("--layouts", default="tp2,pp2,dp2,single", help="comma list of " + ",".join(LAYOUTS))
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 1024; 32 with --tiny)")
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--loss", choices=["fused", "torch"], default=None, help="default: fused on CUDA, torch on CPU")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = parser.parse_args()
    args.seq = args.seq or (32 if args.tiny else 1024)
    args.loss = args.loss or ("fused" if args.device == "cuda" else "torch")
    if args.device == "cpu" and args.tiny:
        args.warmup, args.steps = min(args.warmup, 1), min(args.steps, 2)
    init_distributed(backend="nccl" if args.device == "cuda" else "gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    names = [n.strip() for n in args.layouts.split(",") if n.strip()]
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown or dist.get_world_size() != 2 and any(n != "single" for n in names):
        raise SystemExit(f"layouts {names}: need names from {list(LAYOUTS)} and 2 ranks for tp2/pp2/dp2 "
                         f"(world size is {dist.get_world_size()})")
    config = ModelConfig(**(TINY if args.tiny else QWEN25_05B))
    peak = peak_flops(torch.cuda.get_device_name()) if args.device == "cuda" else None  # FLOP/s; None: no MFU
    results = []
    for name in names:
        record = run_layout(name, args, config, device, peak)
        dist.barrier()
        if record is not None:
            results.append(record)
            print(json.dumps(record), flush=True)
    if dist.get_rank() == 0:
        meta = {"model": "tiny qwen2" if args.tiny else "Qwen2.5-0.5B shape (random weights)",
                "device_name": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                "peak_tflops": peak / 1e12 if peak else None,
                "flops_formula": "6*N + 6*L*S*heads*head_dim per token", "params": param_count(config),
                "global_batch": args.global_batch, "seq": args.seq, "micro_batch": args.micro_batch,
                "loss": args.loss, "torch": torch.__version__, "steps": args.steps, "warmup": args.warmup}
        write(results, meta, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
