"""End-to-end GRPO step throughput: per-phase time (generate, reshard, log-prob, update) and tokens/s per GPU.

Run (1 GPU):             python benchmarks/grpo_e2e.py
Run (2 GPUs):            torchrun --nproc_per_node 2 benchmarks/grpo_e2e.py --layouts 1x1,2x1,1x2
CPU check (gloo, tiny):  python benchmarks/grpo_e2e.py --device cpu --tiny
                         torchrun --nproc_per_node 2 benchmarks/grpo_e2e.py --device cpu --tiny --layouts 2x1,1x2

Model: Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads / 2 kv heads, vocab 151936, tied
embeddings, qkv bias) with random weights built directly on the device in bf16 (`--tiny`: a small
fp32 model). Random weights make any task reward meaningless, so the reward is a cheap
random-token score (fraction of even token ids in the response), which still varies across samples
and so exercises the full GRPO loss. Prompts are random token ids.

Each layout "TPxPP" (dp = world / (tp*pp)) builds the actor (+ a frozen reference: kl_coef > 0, as in
GRPO recipes) and runs `--steps` PPOTrainer steps; the first `--warmup` are not measured. Reported per
layout: mean seconds per phase — generate (rollout engine), reshard (HybridEngine to/from the
inference layout, tp_g = --tp-g or tp), logprob (old + reference log-probs), update (PPO mini-batches,
optimizer) — plus step time, tokens (prompt + response) per second per GPU and generated tokens per
second per GPU. By default the KV cache and CUDA graphs are freed after every rollout (memory goes
back to training) and recaptured in the next; `--keep-cache` keeps them. Rank 0 writes $OUT/grpo_e2e.json and $OUT/grpo_e2e.md (or --out DIR).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics

import torch
import torch.distributed as dist

from verl_mega.models import ModelConfig, build_stage
from verl_mega.rollout.actor import HFActor
from verl_mega.parallel import Layout
from verl_mega.parallel.dist import device as comm_device
from verl_mega.parallel.dist import init_distributed
from verl_mega.trainer import PPOTrainer, TrainerConfig

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                  num_kv_heads=2, head_dim=64, rope_theta=1_000_000.0, max_position_embeddings=32768,
                  tie_word_embeddings=True, attention_bias=True, model_type="qwen2")
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, max_position_embeddings=512, tie_word_embeddings=True, attention_bias=True, model_type="qwen2")
PHASES = ("generate", "reshard", "logprob", "update")
EOS_ID = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="small fp32 model and workload (CPU check)")
    p.add_argument("--layouts", default="1x1", help="comma-separated TPxPP layouts to run, e.g. 1x1,2x1,1x2")
    p.add_argument("--tp-g", type=int, default=None, help="generation tensor-parallel size (default: training tp)")
    p.add_argument("--prompts", type=int, default=64, help="prompts per step (global, split over dp)")
    p.add_argument("--n", type=int, default=8, help="responses per prompt")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward")
    p.add_argument("--mini-batches", type=int, default=1, help="optimizer steps per RL step")
    p.add_argument("--keep-cache", action="store_true",
                   help="keep the KV cache and CUDA graphs between rollouts (default: freed for training, recaptured)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--profile-step", type=int, default=0,
                   help="profile this step (1-based; 0: none): GPU and host time by op/kernel to $OUT/grpo_e2e_profile.txt")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="output directory (default $OUT or .)")
    args = p.parse_args(argv)
    if args.tiny:
        args.prompts, args.n, args.prompt_len, args.max_new_tokens = min(args.prompts, 4), min(args.n, 2), 16, 8
        args.micro_batch, args.steps, args.warmup = 4, 2, 1
    return args


def even_token_reward(response: str) -> float:
    """Fraction of even token ids (the response text is the ids joined by spaces: no tokenizer)."""
    ids = [int(t) for t in response.split()]
    return sum(i % 2 == 0 for i in ids) / max(1, len(ids))


def build_actor(shape: dict, layout: Layout, dtype: torch.dtype) -> HFActor:
    """A random-weight actor stage built directly on this rank's device (no HF directory)."""
    config = ModelConfig(**shape, hf_extra={"eos_token_id": EOS_ID})
    model = build_stage(config, layout, params_dtype=dtype, device=comm_device(), init_seed=0)
    return HFActor(model, layout, config, tokenizer=None, path=None)


def run_layout(args, tp: int, pp: int) -> dict:
    """Build actor + trainer for one layout, run the steps, return mean phase timings and throughput."""
    layout = Layout.create(tp, pp)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    actor = build_actor(TINY if args.tiny else QWEN25_05B, layout, dtype)
    per_dp = max(1, args.prompts // layout.dp)
    cfg = TrainerConfig()
    cfg.model.dtype = "float32" if args.tiny else "bfloat16"
    cfg.data.max_prompt_length = args.prompt_len
    cfg.rollout.engine.max_batch = per_dp * args.n
    cfg.algorithm.kl_coef = 0.001
    cfg.trainer.progress_bar = False
    cfg.parallel.tp_g = args.tp_g
    cfg.rollout.free_cache = not args.keep_cache
    trainer = PPOTrainer(actor, reward_fn=even_token_reward, algorithm="grpo", rollout_batch_size=per_dp,
                         n_samples=args.n, max_new_tokens=args.max_new_tokens, temperature=1.0, lr=1e-6,
                         micro_batch_size=args.micro_batch, mini_batch_size=max(1, per_dp // args.mini_batches),
                         num_epochs=1, config=cfg)
    gen = torch.Generator().manual_seed(1000 + layout.dp_rank)
    vocab = actor.config.vocab_size
    history = []
    for step in range(args.steps):
        samples = [{"prompt_ids": torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist()}
                   for _ in range(per_dp)]
        if step + 1 == args.profile_step:
            metrics = profile_step(trainer, samples, args.out)
        else:
            metrics = trainer.step(samples)
        if step >= args.warmup:
            history.append(metrics)
    result = {"layout": {"tp": tp, "pp": pp, "dp": layout.dp, "tp_g": trainer.worker.tp_g},
              "prompts_per_step": per_dp * layout.dp, "responses_per_step": per_dp * layout.dp * args.n}
    for key in [f"time/{p}" for p in PHASES] + ["time/step", "throughput/tokens_per_s_per_gpu",
                                                 "throughput/gen_tokens_per_s_per_gpu", "response_length/mean"]:
        result[key] = statistics.mean(m.get(key, 0.0) for m in history) if history else None
    hybrid = getattr(trainer.worker.weights, "hybrid", None)  # None: pp = 1, tp_g = tp (weights used in place)
    stats = hybrid.last_stats if hybrid is not None else None
    result["reshard_bytes_moved_per_rank"] = stats.bytes_moved if stats is not None else 0
    result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    del trainer, actor
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def profile_step(trainer, samples, out_dir: str, top: int = 40) -> dict:
    """One trainer step under torch.profiler; writes the ops/kernels with the most GPU time and the
    most host (self) time, with call counts, to out_dir/grpo_e2e_profile.txt (rank 0)."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                    if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=acts) as prof:
        metrics = trainer.step(samples)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    if dist.get_rank() == 0:
        avg = prof.key_averages()
        lines = ["# GPU time by op / kernel (ms, calls; ops include their kernels)"]
        lines += [f"{e.device_time_total / 1e3:9.1f}  {e.count:7d}x  {e.key[:120]}"
                  for e in sorted(avg, key=lambda e: -e.device_time_total)[:top]]
        lines += ["", "# host self time (ms, calls)"]
        lines += [f"{e.self_cpu_time_total / 1e3:9.1f}  {e.count:7d}x  {e.key[:120]}"
                  for e in sorted(avg, key=lambda e: -e.self_cpu_time_total)[:top // 2]]
        lines += ["", "# step metrics (under the profiler)", json.dumps({k: v for k, v in metrics.items()
                                                                        if k.startswith(("time/", "throughput/"))})]
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "grpo_e2e_profile.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return metrics


def markdown(results: list[dict], args, world: int, device: str) -> str:
    lines = [f"# GRPO end-to-end step ({'tiny' if args.tiny else 'Qwen2.5-0.5B shape, bf16'}, {world} x {device})", "",
             f"{args.prompts} prompts x {args.n} responses per step, prompt {args.prompt_len} tokens, "
             f"up to {args.max_new_tokens} new tokens; mean of {args.steps - args.warmup} steps after "
             f"{args.warmup} warm-up.", "",
             "| layout (tp x pp x dp, tp_g) | generate s | reshard s | logprob s | update s | step s "
             "| tokens/s/GPU | gen tokens/s/GPU |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lay = r["layout"]
        cells = [f"{r[f'time/{p}']:.3f}" for p in PHASES] + [f"{r['time/step']:.3f}",
                 f"{r['throughput/tokens_per_s_per_gpu']:.0f}", f"{r['throughput/gen_tokens_per_s_per_gpu']:.0f}"]
        lines.append(f"| {lay['tp']}x{lay['pp']}x{lay['dp']}, tp_g={lay['tp_g']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    init_distributed(backend="gloo" if args.device == "cpu" else None)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no GPU is visible; use --device cpu --tiny for a CPU check")
    world, device_name = dist.get_world_size(), (torch.cuda.get_device_name() if args.device == "cuda" else "cpu")
    results = []
    for spec in args.layouts.split(","):
        tp, pp = (int(x) for x in spec.lower().split("x"))
        results.append(run_layout(args, tp, pp))
        if dist.get_rank() == 0:
            print(json.dumps(results[-1]), flush=True)
    if dist.get_rank() == 0:
        os.makedirs(args.out, exist_ok=True)
        report = {"device": device_name, "world_size": world, "args": vars(args), "results": results}
        with open(os.path.join(args.out, "grpo_e2e.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(args.out, "grpo_e2e.md"), "w") as f:
            f.write(markdown(results, args, world, device_name))
        print(markdown(results, args, world, device_name))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
