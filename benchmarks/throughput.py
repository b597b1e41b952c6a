"""End-to-end GRPO throughput at real model shapes with random weights: tokens/s per GPU, MFU, seconds per
phase, peak memory; JSON + PNG plot + a markdown table.

    python benchmarks/throughput.py --shapes 0.5b,1.5b --batches 8x8 --prompt-len 128 --new-tokens 256 --kl off
    python benchmarks/throughput.py --shapes 0.5b --batches 64x8 --response-len 32:1024 --new-tokens 1024 --kl on,off
    torchrun --nproc-per-node 2 benchmarks/throughput.py --layouts 1x1,2x1,1x2      # N GPUs: every TPxPP layout
    python benchmarks/throughput.py --smoke                                          # CPU check, tiny shape

Every configuration (shape x batch x KL x layout x compile) builds a random-weight actor directly on the device (bf16 on
CUDA; `--smoke`: a tiny fp32 model on CPU), a `PPOTrainer` (GRPO; with KL: a frozen reference and kl_coef 1e-3)
and runs `--steps` RL steps on random prompt ids; the first `--warmup` steps (CUDA-graph capture, kernel
compilation) are not measured. Random weights make any task reward meaningless, so the reward is a cheap
token score (fraction of even ids), which still varies over samples and so exercises the whole GRPO loss.

Response lengths (`--response-len LO:HI`): a random model almost never samples EOS, so each response is
ended with EOS at a length drawn uniformly from [LO, HI] (seeded per step and dp rank; the engine's `eos_at`
hook through `forced_lengths.py`). Generation then runs at the batch's real length mix (a finished row frees
its slot in the continuous-batching engine). Without the flag responses run to
`--new-tokens` (what the TRL comparison uses: TRL's random model does not stop either).

Reported per configuration (mean over measured steps, global batch): tokens/s/GPU = (prompt + response
tokens of every sequence) / step wall time / GPUs; seconds per phase from the trainer's timers (generate,
reshard, logprob = reference log-probs, and old ones where the update does not take its own, reward, update);
peak memory (CUDA max allocated, or the process's max RSS on CPU). MFU = model FLOPs / (step time x GPUs x peak dense bf16 FLOP/s of the GPU, from
`--peak-tflops` or the table below), with model FLOPs counted on valid tokens only (padding excluded):
    forward over a sequence of S tokens = 2 * P * S + 2 * L * (heads * head_dim) * S^2    (causal attention:
        QK^T and AV, 2 * head_dim FLOPs each per query-key pair, S^2 / 2 pairs per layer)
    P = matmul parameters: the layers' linear weights + the LM head (vocab x hidden; counted even when tied,
        since the head matmul runs), embedding lookups and norms excluded
    per step: generation 1 forward (prefill + decode: each token once), log-prob 1 forward (+1 reference
        with KL), update 3 forwards (forward + backward: the 6 x P x tokens rule); activation recomputation,
        if any, is not counted (model FLOPs, not hardware FLOPs).
Rank 0 writes OUT/throughput.json, OUT/throughput.png and OUT/throughput.md (OUT: --out, $OUT or .).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass

# Run as a script, this file's directory heads sys.path, and its kernels.py would shadow the `kernels`
# package that transformers probes for: keep the directory off the path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: benchmarks.*

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from verl_mega.models import ModelConfig, build_stage  # noqa: E402
from verl_mega.rollout.actor import HFActor  # noqa: E402
from verl_mega.rollout.engine_config import ATTENTION, SAMPLERS  # noqa: E402
from verl_mega.parallel import Layout
from verl_mega.parallel.dist import device as comm_device
from verl_mega.parallel.dist import init_distributed

from benchmarks.forced_lengths import force_lengths, parse_length_range  # noqa: E402
from benchmarks import gpu_specs  # noqa: E402
from benchmarks.grpo_e2e import profile_step  # noqa: E402
from verl_mega.trainer import PPOTrainer, TrainerConfig
from verl_mega.trainer.config import update_takes_own_logprobs
from verl_mega.trainer.memory_plan import (AUTO_BUDGET_MARGIN, Offload, Parallelism, Workload, plan_memory,
                                           usable_device_bytes)

QWEN2 = dict(vocab_size=151936, rope_theta=1_000_000.0, max_position_embeddings=32768, tie_word_embeddings=True,
             attention_bias=True, model_type="qwen2")
SHAPES = {
    "0.5b": dict(QWEN2, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
                 head_dim=64),  # Qwen2.5-0.5B
    "1.5b": dict(QWEN2, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12, num_kv_heads=2,
                 head_dim=128),  # Qwen2.5-1.5B
    "7b": dict(QWEN2, vocab_size=152064, tie_word_embeddings=False, hidden_size=3584, intermediate_size=18944,
               num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128),  # Qwen2.5-7B
    "8b": dict(vocab_size=128256, rope_theta=500_000.0, max_position_embeddings=131072, tie_word_embeddings=False,
               attention_bias=False, model_type="llama", hidden_size=4096, intermediate_size=14336, num_layers=32,
               num_heads=32, num_kv_heads=8, head_dim=128),  # Llama-3.1-8B (NeMo-RL's GRPO figure; no rope scaling)
    "smoke": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, max_position_embeddings=512, tie_word_embeddings=True, attention_bias=True,
                  model_type="qwen2"),
}
PHASES = ("generate", "reshard", "logprob", "reward", "update")
EOS_ID = 2


@dataclass(frozen=True)
class BenchConfig:
    """One measured configuration."""

    shape: str  # key of SHAPES
    prompts: int  # prompts per step (global, split over dp)
    n: int  # responses per prompt
    kl: bool  # KL to a frozen reference (kl_coef 1e-3) or none (TRL's default beta=0)
    tp: int
    pp: int
    compile: bool = False  # model.compile: torch.compile'd decoder layers in the training-side passes

    @property
    def name(self) -> str:
        return (f"{self.shape} {self.prompts}x{self.n} kl={'on' if self.kl else 'off'} tp{self.tp}pp{self.pp}"
                + (" compiled" if self.compile else ""))


# ----------------------------------------------------------------------------------------------- arguments
def parse_pairs(text: str, what: str, sep: str) -> list[tuple[int, int]]:
    """'8x8,64x8' -> [(8, 8), (64, 8)] (ValueError naming `what` on bad input)."""
    out = []
    for item in text.split(","):
        parts = item.lower().split(sep)
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"{what}: {item!r} is not two positive integers joined by {sep!r}")
        out.append((int(parts[0]), int(parts[1])))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="0.5b", help=f"comma-separated model shapes: {', '.join(SHAPES)}")
    p.add_argument("--batches", default="8x8", help="comma-separated PROMPTSxSAMPLES per step, e.g. 8x8,64x8")
    p.add_argument("--attention", choices=ATTENTION, default="auto",
                   help="decode attention of the rollout engine (rollout.engine.attention)")
    p.add_argument("--sampler", choices=SAMPLERS, default="auto",
                   help="token sampler of the rollout engine (rollout.engine.sampler)")
    p.add_argument("--kl", default="off", help="KL to a reference: off, on or off,on")
    p.add_argument("--compile", default="off", help="model.compile (torch.compile'd layers in the training passes; "
                                                    "its compile time falls in the warm-up step): off, on or off,on")
    p.add_argument("--layouts", default="1x1", help="comma-separated TPxPP layouts (dp = GPUs / (tp*pp))")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (random ids)")
    p.add_argument("--new-tokens", type=int, default=256, help="max new tokens per response")
    p.add_argument("--response-len", default=None, metavar="LO:HI",
                   help="end each response with EOS at a seeded length uniform in [LO, HI] (default: run to --new-tokens)")
    p.add_argument("--micro-batch", default="auto",
                   help="sequences per forward/backward, or 'auto': per configuration the largest of rows, rows / 2, "
                        "... whose update the trainer's memory planner fits on this GPU (plain sequence counts on CPU); "
                        "or 'tokens-auto': packed micro-batches, both token budgets picked by the trainer "
                        "(trainer.max_tokens_per_micro_batch / logprob_max_tokens_per_micro_batch = auto)")
    p.add_argument("--steps", type=int, default=4, help="RL steps per configuration, warm-up included")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured first steps")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s per GPU for MFU "
                   f"(default by device name: {gpu_specs.PEAK_TFLOPS})")
    p.add_argument("--peer", default=None, metavar="JSON",
                   help="trl_grpo.py's result: added to the table and plot, with verl_mega / TRL tokens/s ratios")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="one more (unmeasured) step per configuration under torch.profiler: GPU and host time by "
                        "op / kernel to OUT/profile_<shape>_<prompts>x<n>.txt")
    p.add_argument("--smoke", action="store_true", help="CPU check: tiny shape, 2x2 batch, short lengths, 2 steps")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="output directory (default $OUT or .)")
    args = p.parse_args(argv)
    if args.smoke:
        args.shapes, args.batches, args.prompt_len, args.new_tokens = "smoke", "2x2", 16, 8
        args.response_len = args.response_len or "2:8"
        args.steps, args.warmup = 2, 1
        args.micro_batch = args.micro_batch if args.micro_batch == TOKENS_AUTO else "4"
    for name in args.shapes.split(","):
        if name not in SHAPES:
            raise ValueError(f"--shapes: unknown shape {name!r}; choose from {', '.join(SHAPES)}")
    for flag in ("kl", "compile"):
        if not set(getattr(args, flag).split(",")) <= {"on", "off"}:
            raise ValueError(f"--{flag} {getattr(args, flag)!r}: use on, off or off,on")
    if args.micro_batch not in ("auto", TOKENS_AUTO) and not (args.micro_batch.isdigit() and int(args.micro_batch) > 0):
        raise ValueError(f"--micro-batch {args.micro_batch!r}: a positive integer, 'auto' or '{TOKENS_AUTO}'")
    if not 0 <= args.warmup < args.steps:
        raise ValueError(f"--warmup {args.warmup} must be in [0, --steps={args.steps})")
    args.response_range = parse_length_range(args.response_len, args.new_tokens)
    return args


def configs(args) -> list[BenchConfig]:
    """Every shape x batch x KL x layout x compile combination, in that nesting order."""
    return [BenchConfig(shape, prompts, n, kl == "on", tp, pp, comp == "on")
            for shape, (prompts, n), kl, (tp, pp), comp in
            itertools.product(args.shapes.split(","), parse_pairs(args.batches, "--batches", "x"),
                              args.kl.split(","), parse_pairs(args.layouts, "--layouts", "x"), args.compile.split(","))]


# ----------------------------------------------------------------------------------------------- workload
def even_token_reward(response: str) -> float:
    """Fraction of even token ids (without a tokenizer the response text is its ids joined by spaces)."""
    ids = [int(t) for t in response.split()]
    return sum(i % 2 == 0 for i in ids) / max(1, len(ids))


# ----------------------------------------------------------------------------------------------- FLOPs
def matmul_params(shape: dict) -> int:
    """Parameters that take part in a matmul per token: every layer's linear weights + the LM head."""
    h, q = shape["hidden_size"], shape["num_heads"] * shape["head_dim"]
    kv = shape["num_kv_heads"] * shape["head_dim"]
    attn = h * (q + 2 * kv) + q * h
    mlp = 3 * h * shape["intermediate_size"]  # gate, up, down
    return shape["num_layers"] * (attn + mlp) + shape["vocab_size"] * h


def forward_flops(shape: dict, seq_lens: torch.Tensor) -> float:
    """Model FLOPs of one forward over sequences of the given valid lengths (see the module docstring)."""
    s = seq_lens.double()
    attn = 2 * shape["num_layers"] * shape["num_heads"] * shape["head_dim"] * (s * s).sum()
    return float(2 * matmul_params(shape) * s.sum() + attn)


def step_flops(shape: dict, seq_lens: torch.Tensor, kl: bool, old_pass: bool = True) -> dict[str, float]:
    """FLOPs of one GRPO step per phase: generate 1 forward, logprob 1 with the separate old-log-prob pass (+1 with
    KL; `trainer.old_logprobs`), update 3."""
    fwd = forward_flops(shape, seq_lens)
    return {"generate": fwd, "logprob": fwd * (int(old_pass) + int(kl)), "update": 3 * fwd}


def peak_flops(args, device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of one GPU: --peak-tflops, else by device name, else None (no MFU)."""
    if args.peak_tflops is not None:
        return args.peak_tflops * 1e12
    return gpu_specs.peak_flops(device_name)


# ----------------------------------------------------------------------------------------------- running


TOKENS_AUTO = "tokens-auto"  # --micro-batch: packed, the trainer's `auto` token budgets


def micro_batch(args, shape: dict, bc: BenchConfig, layout: Layout) -> int:
    """--micro-batch, or for 'auto' the largest rows / 2^k (rows = this dp rank's sequences per step) whose
    planned peak (packed micro-batches, no offload: `memory_plan.plan_memory`) fits AUTO_BUDGET_MARGIN (the
    trainer's share for `auto` budgets) of this GPU's usable memory; without a capacity (CPU) all rows."""
    rows = bc.prompts // layout.dp * bc.n
    if args.micro_batch == TOKENS_AUTO:  # the sequence count is only the trainer's fallback without a capacity (CPU)
        return rows
    if args.micro_batch != "auto":
        return int(args.micro_batch)
    capacity = usable_device_bytes(comm_device())
    mb = rows
    while mb > 1 and capacity is not None:
        work = Workload(micro_batch_size=mb, seq_len=args.prompt_len + args.new_tokens, response_len=args.new_tokens,
                        rollout_rows=rows, num_microbatches=-(-rows // mb), packed=True, compiled=bc.compile)
        plan = plan_memory(ModelConfig(**shape), Parallelism(bc.tp, bc.pp, layout.dp), work, Offload(),
                           param_bytes=2, reference=bc.kl)  # (a capacity means CUDA: bf16 weights)
        if plan.peak <= capacity * AUTO_BUDGET_MARGIN:
            break
        mb = -(-mb // 2)
    return mb


def build_actor(shape: dict, layout: Layout, dtype: torch.dtype, seed: int) -> HFActor:
    """A random-weight actor stage built directly on this rank's device (no HF directory)."""
    config = ModelConfig(**shape, hf_extra={"eos_token_id": EOS_ID})
    model = build_stage(config, layout, params_dtype=dtype, device=comm_device(), init_seed=seed)
    return HFActor(model, layout, config, tokenizer=None, path=None)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_config(args, bc: BenchConfig, peak: float | None) -> dict:
    """Build actor + trainer for one configuration, run the steps, return mean timings and throughput."""
    shape = SHAPES[bc.shape]
    on_cpu = not torch.cuda.is_available()
    layout = Layout.create(bc.tp, bc.pp)
    if bc.prompts % layout.dp:
        raise ValueError(f"--batches: {bc.prompts} prompts do not split over dp={layout.dp}")
    per_dp = bc.prompts // layout.dp
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    actor = build_actor(shape, layout, torch.float32 if on_cpu else torch.bfloat16, args.seed)
    cfg = TrainerConfig()
    cfg.model.dtype = "float32" if on_cpu else "bfloat16"
    cfg.data.max_prompt_length = args.prompt_len
    cfg.rollout.engine.max_batch = per_dp * bc.n
    cfg.rollout.engine.attention = args.attention
    cfg.rollout.engine.sampler = args.sampler
    cfg.algorithm.kl_coef = 1e-3 if bc.kl else 0.0
    cfg.model.compile = bc.compile
    cfg.trainer.progress_bar = False
    if args.micro_batch == TOKENS_AUTO:
        cfg.trainer.packing = True
        cfg.trainer.max_tokens_per_micro_batch = cfg.trainer.logprob_max_tokens_per_micro_batch = "auto"
    mb = micro_batch(args, shape, bc, layout)
    trainer = PPOTrainer(actor, reward_fn=even_token_reward, algorithm="grpo", rollout_batch_size=per_dp,
                         n_samples=bc.n, max_new_tokens=args.new_tokens, temperature=1.0, lr=1e-6,
                         micro_batch_size=mb, mini_batch_size=per_dp, num_epochs=1, config=cfg)
    force_lengths(trainer, args.response_range, eos_token_id=EOS_ID)
    gen = torch.Generator().manual_seed(args.seed * 1000 + layout.dp_rank)

    def draw_prompts() -> list[dict]:  # this dp rank's prompts of one step: random ids
        return [{"prompt_ids": torch.randint(3, shape["vocab_size"], (args.prompt_len,), generator=gen).tolist()}
                for _ in range(per_dp)]

    steps = []
    # compiled layers: one more warm-up step (a graph first met after step 1, e.g. a micro-batch of one sequence,
    # compiles there), and as many measured steps as the others
    warmup = args.warmup + bc.compile
    for step in range(args.steps + bc.compile):
        samples = draw_prompts()
        sync()
        start = time.perf_counter()
        metrics = trainer.step(samples)
        sync()
        wall = time.perf_counter() - start
        if step >= warmup:
            steps.append(step_record(trainer, metrics, wall, shape, bc, layout))
    if args.profile:  # an extra step, so the profiler's overhead stays out of the measured ones
        profile_step(trainer, draw_prompts(), args.out, f"profile_{bc.shape}_{bc.prompts}x{bc.n}.txt")
    result = summarize(steps, bc, layout, peak)
    t = trainer.config.trainer
    result["micro_batch"] = (f"{t.max_tokens_per_micro_batch} / {t.logprob_max_tokens_per_micro_batch} tokens"
                             if args.micro_batch == TOKENS_AUTO else mb)  # the trainer's picks: update / forward-only
    result["peak_memory_gib"] = (torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available()
                                 else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)  # KiB -> GiB
    result["plan_peak_gib"] = trainer.memory_plan.peak / 2**30  # the trainer's planned peak per GPU
    del trainer, actor
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def step_record(trainer, metrics: dict, wall: float, shape: dict, bc: BenchConfig, layout: Layout) -> dict:
    """This step's global tokens, FLOPs (summed over dp ranks) and timings."""
    seq_lens = trainer.last_batch.attention_mask.sum(-1)  # [rows] valid prompt + response tokens
    flops = step_flops(shape, seq_lens, bc.kl, old_pass=not update_takes_own_logprobs(trainer.config))
    local = torch.tensor([sum(flops.values())], dtype=torch.float64, device=comm_device())
    if layout.world_size > 1:  # model-parallel ranks hold the same rows: sum over the world / (tp * pp)
        dist.all_reduce(local)
    return {"wall_s": wall, "flops": float(local.item()) / (layout.tp * layout.pp),
            "tokens": metrics["prompt_length/tokens"] + metrics["response_length/tokens"],
            "response_tokens": metrics["response_length/tokens"],
            **{p: metrics.get(f"time/{p}", 0.0) for p in PHASES}}


def summarize(steps: list[dict], bc: BenchConfig, layout: Layout, peak: float | None) -> dict:
    """Means over the measured steps: throughput, MFU, phase seconds."""
    mean = {k: statistics.mean(s[k] for s in steps) for k in steps[0]}
    world, rows = layout.world_size, bc.prompts * bc.n
    phases = {p: mean[p] for p in PHASES}
    phases["other"] = max(0.0, mean["wall_s"] - sum(phases.values()))
    return {"config": asdict(bc), "name": bc.name, "gpus": world, "dp": layout.dp, "measured_steps": len(steps),
            "step_s": mean["wall_s"], "phase_s": phases,
            "tokens_per_step": mean["tokens"], "mean_response_len": mean["response_tokens"] / rows,
            "tokens_per_s_per_gpu": mean["tokens"] / mean["wall_s"] / world,
            "gen_tokens_per_s_per_gpu": mean["response_tokens"] / mean["generate"] / world if mean["generate"] else None,
            "model_tflops_per_step": mean["flops"] / 1e12,
            "mfu": mean["flops"] / (mean["wall_s"] * world * peak) if peak else None}


# ----------------------------------------------------------------------------------------------- reporting
def peer_ratios(results: list[dict], peer: dict) -> list[dict]:
    """verl_mega / peer tokens/s/GPU for every configuration with the peer's shape, batch and lengths, KL off."""
    a = peer["args"]
    out = []
    for r in results:
        c = r["config"]
        if (c["shape"], c["prompts"], c["n"], c["kl"]) == (a["shape"], a["prompts"], a["n"], False):
            out.append({"name": r["name"], "peer": peer["framework"],
                        "ratio": r["tokens_per_s_per_gpu"] / peer["tokens_per_s_per_gpu"]})
    return out


def markdown(report: dict) -> str:
    """The results table with machine, date and command."""
    a = report["args"]
    lengths = f"EOS at lengths uniform in [{a['response_len'].replace(':', ', ')}]" if a["response_len"] \
        else f"responses run to {a['new_tokens']} tokens"
    lines = [f"# GRPO end-to-end throughput ({report['world_size']} x {report['device']}, {report['date']})", "",
             f"`{report['command']}`", "",
             f"Random weights; prompt {a['prompt_len']} tokens, up to {a['new_tokens']} new tokens ({lengths}); "
             f"mean of {a['steps'] - a['warmup']} steps after {a['warmup']} warm-up; tokens = prompt + response of "
             f"every sequence; MFU on model FLOPs (6 x params x tokens + attention for the update, 2 x for "
             f"forward-only passes) against " + (f"{report['peak_tflops']} TFLOP/s per GPU." if report["peak_tflops"]
                                               else "an unknown peak (pass --peak-tflops)."), "",
             "| configuration | GPUs | micro-batch | step s | tokens/s/GPU | MFU | generate s | reshard s | logprob s "
             "| reward s | update s | mean resp. len | peak mem GiB (plan) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        cells = [r["name"], str(r["gpus"]), str(r["micro_batch"]), f"{r['step_s']:.3f}", f"{r['tokens_per_s_per_gpu']:.0f}", mfu,
                 *[f"{r['phase_s'][p]:.3f}" for p in PHASES], f"{r['mean_response_len']:.0f}",
                 f"{r['peak_memory_gib']:.1f} ({r['plan_peak_gib']:.1f})"]
        lines.append("| " + " | ".join(cells) + " |")
    peer = report.get("peer")
    if peer:
        pa = peer["args"]
        mem = f"{peer['peak_memory_gib']:.1f}" if peer["peak_memory_gib"] is not None else "-"
        lines.append(f"| {peer['framework']} {pa['shape']} {pa['prompts']}x{pa['n']} beta=0 | {peer['gpus']} | "
                     f"{pa['micro_batch']} | {peer['step_s']:.3f} | {peer['tokens_per_s_per_gpu']:.0f} | - | - | - | - | - | - | "
                     f"{peer['mean_response_len']:.0f} | {mem} |")
        lines += [""] + [f"- {q['name']} / {q['peer']}: **{q['ratio']:.1f}x** tokens/s/GPU"
                         for q in report["peer_ratios"]]
        lines += ["", f"Peer: `{peer['command']}` (prompt {pa['prompt_len']}, {pa['new_tokens']} new tokens, "
                      f"gradient checkpointing {pa['gradient_checkpointing']}; {peer['device']}, {peer['date']})"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
    """PNG: tokens/s/GPU per configuration (left) and its step time split by phase (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results, peer = report["results"], report.get("peer")
    names = [r["name"] for r in results]
    bars = [(n, r["tokens_per_s_per_gpu"], "tab:blue") for n, r in zip(names, results)]
    if peer:
        bars.append((f"{peer['framework']} {peer['args']['shape']} {peer['args']['prompts']}x{peer['args']['n']}",
                     peer["tokens_per_s_per_gpu"], "tab:gray"))
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 2.2 + 0.6 * len(bars)), constrained_layout=True)
    left.barh([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    left.set_xlabel("tokens / s / GPU (prompt + response)")
    left.invert_yaxis()
    starts = [0.0] * len(results)
    for phase in PHASES + ("other",):
        widths = [r["phase_s"][phase] for r in results]
        right.barh(names, widths, left=starts, label=phase)
        starts = [s + w for s, w in zip(starts, widths)]
    right.set_xlabel("seconds per step")
    right.invert_yaxis()
    right.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    fig.suptitle(f"GRPO step, {report['world_size']} x {report['device']}, {report['date']}")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    init_distributed(backend="gloo" if not torch.cuda.is_available() else None)
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("no GPU visible: real shapes need CUDA; use --smoke for the CPU check")
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})"
    peak = peak_flops(args, device_name)
    results = []
    for bc in configs(args):
        results.append(run_config(args, bc, peak))
        if dist.get_rank() == 0:
            print(json.dumps(results[-1]), flush=True)
    if dist.get_rank() == 0:
        report = {"device": device_name, "world_size": dist.get_world_size(), "peak_tflops": peak / 1e12 if peak else None,
                  "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  "command": "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  "torch": torch.__version__, "args": {k: v for k, v in vars(args).items() if k != "response_range"},
                  "results": results}
        if args.peer:
            with open(args.peer) as f:
                report["peer"] = json.load(f)
            report["peer_ratios"] = peer_ratios(results, report["peer"])
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "throughput.json"), "w") as f:
            json.dump(report, f, indent=2)
        with open(os.path.join(args.out, "throughput.md"), "w") as f:
            f.write(markdown(report))
        plot(report, os.path.join(args.out, "throughput.png"))
        print(markdown(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
