"""Smoke test of tensor parallelism on real devices: tp=2 logits vs tp=1 logits of the same HF checkpoint.

Run (2 GPUs, NCCL, bf16):   torchrun --nproc_per_node 2 benchmarks/gpu_smoke_tp.py
CPU check (gloo, small):    torchrun --nproc_per_node 2 benchmarks/gpu_smoke_tp.py --device cpu --small

Rank 0 writes a random-weight HF directory (Llama shape: hidden 1024, 4 layers, 16 heads / 8 kv
heads, vocab 32000; `--small` shrinks it) with transformers; both ranks then load it
- as tp=1 in the working dtype (each rank a full replica, dp=2) and in fp32 (the reference),
- as tp=2 in the working dtype,
and compare logits at the non-pad positions of a left-padded batch. Printed and, if $OUT is set,
written to $OUT/gpu_smoke_tp.json: max abs / relative error of tp2 vs tp1, and of both vs fp32
(tp2's error against fp32 should be of the same size as tp1's: bf16 rounding, not a TP bug).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from verl_mega.rollout.actor import get_actor_model
from verl_mega.parallel import Layout
from verl_mega.parallel.dist import init_distributed
from verl_mega.testing.tiny_hf import make_tiny_hf_model

FULL = dict(hidden_size=1024, intermediate_size=2816, num_layers=4, num_heads=16, head_dim=64, num_kv_heads=8,
            vocab_size=32000)
SMALL = dict(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, head_dim=16, num_kv_heads=2,
             vocab_size=1000)


def left_padded_batch(batch: int, seq: int, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, : (b * seq) // (2 * batch)] = 0  # row b has b/(2*batch) of its length as left padding
    return ids.masked_fill(mask == 0, 0).to(device), mask.to(device)


def errors(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> dict:
    diff = (out.float() - ref.float())[mask.bool()]
    scale = ref.float()[mask.bool()].abs()
    return {"max_abs": diff.abs().max().item(), "rel_max": (diff.abs().max() / scale.max()).item(),
            "rel_mean": (diff.abs().mean() / scale.mean()).item(),
            "argmax_agree": (out.argmax(-1) == ref.argmax(-1))[mask.bool()].float().mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--small", action="store_true", help="tiny shapes (for a CPU check)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "verl_mega_gpu_smoke_tp"))
    args = parser.parse_args()

    init_distributed(backend="nccl" if args.device == "cuda" else "gloo")
    if dist.get_world_size() != 2:
        raise ValueError(f"run with 2 ranks (torchrun --nproc_per_node 2), got world size {dist.get_world_size()}")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    shapes = SMALL if args.small else FULL
    path = os.path.join(args.workdir, "small" if args.small else "full")
    if dist.get_rank() == 0:
        t = time.time()
        make_tiny_hf_model(path, "llama", with_tokenizer=False, seed=0, **shapes)
        print(f"wrote random HF model to {path} in {time.time() - t:.1f} s", flush=True)
    dist.barrier()

    ids, mask = left_padded_batch(args.batch, args.seq, shapes["vocab_size"], device)
    tp1_layout, tp2_layout = Layout.create(1, 1), Layout.create(2, 1)
    timings, logits = {}, {}
    for name, layout, dtype in (("tp1_fp32", tp1_layout, torch.float32), ("tp1", tp1_layout, args.dtype),
                                ("tp2", tp2_layout, args.dtype)):
        actor = get_actor_model(path, torch_dtype=dtype, layout=layout, device=device)
        actor.logits(ids, mask)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.time()
        logits[name] = actor.logits(ids, mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        timings[name] = time.time() - t
        del actor

    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "backend": dist.get_backend(), "dtype": str(args.dtype), "shapes": shapes,
        "batch": args.batch, "seq": args.seq,
        "tp2_vs_tp1": errors(logits["tp2"], logits["tp1"], mask),
        "tp1_vs_fp32": errors(logits["tp1"], logits["tp1_fp32"], mask),
        "tp2_vs_fp32": errors(logits["tp2"], logits["tp1_fp32"], mask),
        "forward_seconds": timings,
    }
    if dist.get_rank() == 0:
        print(json.dumps(report, indent=2), flush=True)
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], "gpu_smoke_tp.json"), "w") as f:
                json.dump(report, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
