"""End-to-end GRPO step throughput: per-phase time (generate, reshard, log-prob, update) and tokens/s per GPU.

Run (1 GPU):             python benchmarks/grpo_e2e.py
Run (2 GPUs):            torchrun --nproc_per_node 2 benchmarks/grpo_e2e.py --layouts 1x1,2x1,1x2
Packed vs padded A/B:    python benchmarks/grpo_e2e.py --ab 0.5b,1.5b --response-len 32:1024 --max-new-tokens 1024 \\
                             --max-tokens 16384 --steps 3
CPU check of the A/B:    python benchmarks/grpo_e2e.py --device cpu --smoke --ab tiny --response-len 2:8 --max-tokens 40
CPU check (gloo, tiny):  python benchmarks/grpo_e2e.py --device cpu --tiny
                         torchrun --nproc_per_node 2 benchmarks/grpo_e2e.py --device cpu --tiny --layouts 2x1,1x2
7B on one GPU (issue 15): python benchmarks/grpo_e2e.py --shape 7b --offload-optimizer --offload-grads --prompts 16 \
                             --n 8 --prompt-len 512 --response-len 32:1024 --max-new-tokens 1024 --micro-batch 4
Offload check (CPU):     python benchmarks/grpo_e2e.py --device cpu --smoke --offload-optimizer --offload-reference \
                             --offload-grads --memory-gib 1

Memory (issue 15): `--offload-optimizer / --offload-reference / --offload-grads / --offload-auto` set the
trainer's `offload` section (`--memory-gib`: the device memory the planner checks against). Each result
also has the memory planner's estimate (peak, phase, table) next to the measured peak GPU memory
(max_memory_allocated over the run, from before the build) and the process's host memory (VmRSS, ru_maxrss).

Model: Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads / 2 kv heads, vocab 151936, tied
embeddings, qkv bias) with random weights built directly on the device in bf16 (`--tiny`: a small
fp32 model). Random weights make any task reward meaningless, so the reward is a cheap
random-token score (fraction of even token ids in the response), which still varies across samples
and so exercises the full GRPO loss. Prompts are random token ids.

Each layout "TPxPP" (dp = world / (tp*pp)) builds the actor (+ a frozen reference: kl_coef > 0, as in
GRPO recipes) and runs `--steps` PPOTrainer steps; the first `--warmup` are not measured (with model.compile one
more warm-up step runs first: a graph first met after step 1, e.g. a micro-batch of one sequence, compiles there). Reported per
layout: mean seconds per phase — generate (rollout engine), reshard (HybridEngine to/from the
inference layout, tp_g = --tp-g or tp), logprob (reference log-probs, and the old ones where the update does
not take its own: trainer.old_logprobs, --old-logprobs / the +oldpass variants), update (PPO mini-batches,
optimizer) — plus step time, tokens (prompt + response) per second per GPU and generated tokens per
second per GPU, and the seconds of generation spent capturing CUDA graphs. By default the KV cache is freed
after every rollout (memory goes back to training) and the paged decode's CUDA graphs stay (they read the
cache through its address table); `--keep-cache` keeps the cache too, `--recapture` frees the graphs with it
(the engine before graphs survived a release: every rollout captures its graphs again). Rank 0 writes $OUT/grpo_e2e.json and $OUT/grpo_e2e.md (or --out DIR).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import sys

# this directory holds kernels.py, which would shadow the `kernels` package transformers probes for
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: benchmarks.*

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.forced_lengths import force_lengths, parse_length_range  # noqa: E402
from benchmarks.generation import fill_random_  # noqa: E402
from benchmarks.gpu_clocks import GPUClocks  # noqa: E402
from benchmarks.gpu_specs import peak_tflops  # noqa: E402
from benchmarks.profile_gaps import from_profiler, stage_report  # noqa: E402
from benchmarks.step_probes import GCPauses, HostUse, TritonCompiles, alloc_retries, dynamo_graphs  # noqa: E402
from verl_mega.models import ModelConfig, build_stage  # noqa: E402
from verl_mega.rollout.actor import HFActor
from verl_mega.rollout.engine_config import ATTENTION, SAMPLERS
from verl_mega.parallel import Layout
from verl_mega.parallel.dist import device as comm_device
from verl_mega.parallel.dist import init_distributed
from verl_mega.trainer import PPOTrainer, TrainerConfig
from verl_mega.trainer.config import update_takes_own_logprobs
from verl_mega.trainer.memory_plan import AUTO_TOKEN_BUDGETS, GIB, plan_fits_margin, usable_device_bytes
from verl_mega.trainer.stages import Pipeline

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                  num_kv_heads=2, head_dim=64, rope_theta=1_000_000.0, max_position_embeddings=32768,
                  tie_word_embeddings=True, attention_bias=True, model_type="qwen2")
QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                  num_kv_heads=2, head_dim=128, rope_theta=1_000_000.0, max_position_embeddings=32768,
                  tie_word_embeddings=True, attention_bias=True, model_type="qwen2")
QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                 num_kv_heads=4, head_dim=128, rope_theta=1_000_000.0, max_position_embeddings=32768,
                 tie_word_embeddings=False, attention_bias=True, model_type="qwen2")
SHAPES = {"0.5b": QWEN25_05B, "1.5b": QWEN25_15B, "7b": QWEN25_7B}
# A/B variants (--ab): (trainer.packing, model.recompute, model.compile, trainer.old_logprobs); "+oldpass": the
# separate old-log-prob pass before the update (trainer.old_logprobs: recompute; the default before session 18)
VARIANTS = {"padded": (False, "none", False, "auto"), "packed": (True, "none", False, "auto"),
            "packed+selective": (True, "selective", False, "auto"), "packed+full": (True, "full", False, "auto"),
            "packed+compile": (True, "none", True, "auto"), "packed+compile+full": (True, "full", True, "auto"),
            "packed+compile+selective": (True, "selective", True, "auto"),
            "padded+oldpass": (False, "none", False, "recompute"),
            "packed+compile+oldpass": (True, "none", True, "recompute")}
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, max_position_embeddings=512, tie_word_embeddings=True, attention_bias=True, model_type="qwen2")
PHASES = ("generate", "reshard", "logprob", "update")
EOS_ID = 2


def budget_candidates(args) -> list[int]:
    """`auto` budgets' candidates, largest first: the trainer's (memory_plan.AUTO_TOKEN_BUDGETS) not below one whole
    sequence (--prompt-len + --max-new-tokens), as `trainer.max_tokens_per_micro_batch: auto` takes them."""
    seq = args.prompt_len + args.max_new_tokens
    return [size for size in AUTO_TOKEN_BUDGETS if size >= seq] or [seq]


def variant_spec(name: str) -> tuple[tuple[bool, str, bool, str], int]:
    """An A/B variant's VARIANTS entry and trainer.pad_to_multiple_of: a name may end in "@N" (e.g. padded@128:
    the padded variant with each batch's width P + R padded to a multiple of N)."""
    base, _, multiple = name.partition("@")
    if base not in VARIANTS or (multiple and not multiple.isdigit()):
        raise ValueError(f"--variants: unknown {name!r}; choose from {', '.join(VARIANTS)} (each may end in @N)")
    return VARIANTS[base], int(multiple or 1)


def token_budget(text: str) -> int | str:
    """--max-tokens: a positive token count or 'auto'."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive token count or 'auto', got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="small fp32 model and workload (CPU check)")
    p.add_argument("--smoke", action="store_true", help="= --tiny")
    p.add_argument("--layouts", default="1x1", help="comma-separated TPxPP layouts to run, e.g. 1x1,2x1,1x2")
    p.add_argument("--tp-g", type=int, default=None, help="generation tensor-parallel size (default: training tp)")
    p.add_argument("--prompts", type=int, default=64, help="prompts per step (global, split over dp)")
    p.add_argument("--n", type=int, default=8, help="responses per prompt")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward")
    p.add_argument("--response-len", default=None,
                   help="LO:HI: each response ends with EOS at a length drawn uniformly from [LO, HI] (seeded per "
                        "step and dp rank), forced during generation (forced_lengths.py), so generation and the "
                        "training passes see a realistic length spread; default: as generated")
    p.add_argument("--max-tokens", type=token_budget, default=None,
                   help="trainer.max_tokens_per_micro_batch of the packed runs (default: --micro-batch sequences); "
                        "auto: per shape the largest of the trainer's auto candidates ("
                        + "/".join(map(str, AUTO_TOKEN_BUDGETS)) + ", not below one whole sequence) whose memory "
                        "plans fit this device, for the packed runs and for padded ones of budget // --max-new-tokens "
                        "sequences (which the padded runs then use instead of --micro-batch)")
    p.add_argument("--logprob-max-tokens", type=token_budget, default=None,
                   help="trainer.logprob_max_tokens_per_micro_batch of the packed runs, and the padded runs' "
                        "trainer.logprob_micro_batch_size of that many tokens // --max-new-tokens sequences: the "
                        "forward-only passes' own size (default: the training size); auto: per shape the largest of "
                        "the same candidates, not below the training budget, whose memory plans fit this device")
    p.add_argument("--ab-budget", choices=("shared", "own"), default="shared",
                   help="--ab with auto budgets: shared = one budget per shape that every variant's plan fits (like "
                        "for like), own = each variant the largest its own plan fits (what `auto` gives a user of "
                        "that path)")
    p.add_argument("--packing", choices=("on", "off"), default="on", help="trainer.packing (single-variant runs)")
    p.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    p.add_argument("--compile", action="store_true", help="model.compile: torch.compile'd layers in the training passes")
    p.add_argument("--old-logprobs", choices=("auto", "recompute"), default="auto",
                   help="trainer.old_logprobs (single-variant runs): auto = an on-policy update takes its own forward's "
                        "log-probs as the old ones; recompute = a separate pass before the update")
    p.add_argument("--varlen-kernel", choices=("auto", "varlen", "flex", "loop"), default="auto",
                   help="packed attention kernel (verl_mega/models/varlen_attention.py); pick with varlen_attention.py")
    p.add_argument("--shape", choices=tuple(SHAPES), default="0.5b", help="model shape (ignored with --tiny)")
    p.add_argument("--ab", default=None,
                   help="A/B in one process: comma-separated shapes (0.5b,1.5b; 'tiny' for a CPU check), each run "
                        f"with the variants {', '.join(VARIANTS)}; reports tokens/s, update MFU and peak memory")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated --ab variants to run (default all: {','.join(VARIANTS)})")
    p.add_argument("--mini-batches", type=int, default=1, help="optimizer steps per RL step")
    p.add_argument("--offload-optimizer", action="store_true", help="offload.optimizer: masters + Adam on the host")
    p.add_argument("--offload-reference", action="store_true", help="offload.reference: stream reference layers")
    p.add_argument("--offload-grads", action="store_true", help="offload.grads: training state off the GPU in rollout")
    p.add_argument("--offload-auto", action="store_true", help="offload.auto: the memory planner picks the switches")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="device memory the planner checks against (default: CUDA's; needed for a check on CPU)")
    p.add_argument("--attention", choices=ATTENTION, default="auto",
                   help="decode attention of the rollout engine (rollout.engine.attention)")
    p.add_argument("--sampler", choices=SAMPLERS, default="auto",
                   help="token sampler of the rollout engine (rollout.engine.sampler)")
    p.add_argument("--graph-window", choices=("on", "off"), default="off",
                   help="rollout.engine.cuda_graph_window: a decode window (8 steps + sampling) as one CUDA graph")
    p.add_argument("--keep-cache", action="store_true",
                   help="keep the KV cache between rollouts (default: freed for training; the CUDA graphs stay)")
    p.add_argument("--recapture", action="store_true",
                   help="free the CUDA graphs with the KV cache after every rollout (captured again in the next)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--profile-step", type=int, default=0,
                   help="profile this step (1-based; 0: none): GPU and host time by op/kernel to $OUT/grpo_e2e_profile.txt")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="output directory (default $OUT or .)")
    args = p.parse_args(argv)
    for name in args.variants.split(","):
        variant_spec(name)  # ValueError naming an unknown one
    if args.tiny or args.smoke:
        args.tiny = True
        args.prompts, args.n, args.prompt_len, args.max_new_tokens = min(args.prompts, 4), min(args.n, 2), 16, 8
        args.micro_batch, args.steps, args.warmup = 4, 2, 1
        if args.response_len:
            args.response_len = "2:8"
        if args.max_tokens:
            args.max_tokens = 40
        if args.logprob_max_tokens:
            args.logprob_max_tokens = 80
    return args


def even_token_reward(response: str) -> float:
    """Fraction of even token ids (the response text is the ids joined by spaces: no tokenizer)."""
    ids = [int(t) for t in response.split()]
    return sum(i % 2 == 0 for i in ids) / max(1, len(ids))


def build_actor(shape: dict, layout: Layout, dtype: torch.dtype) -> HFActor:
    """A random-weight actor stage built directly on this rank's device (no HF directory). On CUDA the
    weights are drawn there (`DecoderModel.init_weights` draws each tensor on the CPU: minutes at 7B)."""
    config = ModelConfig(**shape, hf_extra={"eos_token_id": EOS_ID})
    device = comm_device()
    on_cuda = device.type == "cuda"
    model = build_stage(config, layout, params_dtype=dtype, device=device, init_seed=None if on_cuda else 0)
    if on_cuda:
        fill_random_(model, torch.Generator(device).manual_seed(layout.tp_rank * 1000 + layout.pp_rank))
    return HFActor(model, layout, config, tokenizer=None, path=None)


def host_rss_gib() -> tuple[float, float]:
    """(current, peak) resident host memory of this process in GiB (Linux /proc and ru_maxrss)."""
    current = 0.0
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    current = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory_report(trainer) -> dict:
    """Offload switches, the planner's estimate (peak, phase, per phase, host) and this process's host memory."""
    plan = trainer.memory_plan
    current, peak = host_rss_gib()
    return {"offload": {k: getattr(trainer.offload, k) for k in ("optimizer", "reference", "grads")},
            "plan_peak_gib": plan.peak / GIB, "plan_peak_phase": plan.peak_phase,
            "plan_phases_gib": {ph: round(sum(c.values()) / GIB, 3) for ph, c in plan.phases.items()},
            "plan_host_gib": sum(plan.host.values()) / GIB, "plan_table": plan.table(),
            "host_rss_gib": current, "host_peak_rss_gib": peak}


def record_lengths_stage(record: list):
    """A stage for after the rollout: record the step's sequence lengths into `record` (for the FLOP count), and
    the padded width P + R every padded micro-batch has (its alignment sets the padded passes' speed:
    results/h100_2026-12-07d)."""

    def record_lengths(batch, ctx):
        lengths = batch.attention_mask.sum(-1).double()
        record.append({"tokens": float(lengths.sum()), "response_tokens": float(batch.response_mask.sum()),
                       "sum_len_sq": float((lengths ** 2).sum()), "width": batch.input_ids.shape[1]})
        return batch

    return record_lengths


def _free_graphs(worker):
    """A stage for after the rollout (`--recapture`): free the engine's KV cache and CUDA graphs."""

    def free_graphs(batch, ctx):
        worker.release()
        return batch

    return free_graphs


def _reset_peak(batch, ctx):
    """Stage before the update: peak-memory counter from here (the update's own peak, not the rollout's KV cache)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return batch


def _record_peak(peaks: list):
    def record_peak(batch, ctx):
        """Stage after the update: its peak memory (GiB)."""
        if torch.cuda.is_available():
            peaks.append(torch.cuda.max_memory_allocated() / 2**30)
        return batch
    return record_peak


def update_flops(config: ModelConfig, model, step: dict) -> float:
    """Model FLOPs of one update pass over a step's sequences (fwd + bwd, recompute not counted):
    6 x (matmul params except the LM head) x all tokens + 6 x (LM head params) x response tokens (the head
    runs on response tokens only) + causal attention 12 x layers x (heads x head_dim) x sum(len^2) / 2."""
    embed = config.padded_vocab_size(1) * config.hidden_size
    body = sum(p.numel() for p in model.parameters()) - embed  # tied single stage: the head is the embedding
    attention = 12 * config.num_layers * config.num_heads * config.head_dim * step["sum_len_sq"] / 2
    return 6 * body * step["tokens"] + 6 * embed * step["response_tokens"] + attention


def trainer_config(args, per_dp: int, packing: bool, recompute: str, compile_layers: bool, old_logprobs: str,
                   max_tokens: int | None, micro_batch: int, logprob_tokens: int | None = None) -> TrainerConfig:
    """The run's whole TrainerConfig (GRPO with a reference model): what the trainer is built from and what
    `--max-tokens auto` plans with. max_tokens: the packed runs' token budget; micro_batch: sequences per
    padded forward/backward; logprob_tokens: the forward-only passes' token budget (packed), or as sequences of
    --max-new-tokens (padded); None: the training sizes."""
    cfg = TrainerConfig()
    cfg.model.dtype = "float32" if args.tiny else "bfloat16"
    cfg.model.recompute, cfg.model.compile = recompute, compile_layers
    cfg.data.max_prompt_length = args.prompt_len
    cfg.algorithm.name = "grpo"
    cfg.algorithm.kl_coef = 0.001  # > 0: a reference model (as in GRPO recipes)
    r = cfg.rollout
    r.n_samples, r.max_new_tokens, r.temperature = args.n, args.max_new_tokens, 1.0
    r.engine.max_batch = per_dp * args.n
    r.engine.attention, r.engine.sampler = args.attention, args.sampler
    r.engine.cuda_graph_window = args.graph_window == "on"
    r.free_cache = not args.keep_cache
    t = cfg.trainer
    t.rollout_batch_size, t.num_epochs, t.progress_bar = per_dp, 1, False
    t.micro_batch_size, t.mini_batch_size = micro_batch, max(1, per_dp // args.mini_batches)
    t.packing, t.old_logprobs = packing, old_logprobs
    t.max_tokens_per_micro_batch = max_tokens if packing else None
    if logprob_tokens is not None:
        t.logprob_max_tokens_per_micro_batch = logprob_tokens if packing else None
        t.logprob_micro_batch_size = None if packing else max(1, logprob_tokens // args.max_new_tokens)
    cfg.optim.lr = 1e-6
    cfg.parallel.tp_g = args.tp_g
    o = cfg.offload
    o.optimizer, o.reference, o.grads, o.auto = (args.offload_optimizer, args.offload_reference, args.offload_grads,
                                                 args.offload_auto)
    o.memory_gib = args.memory_gib
    return cfg


def auto_token_budget(args, shape: dict, variants: list[tuple[bool, str, bool, str]], layout: Layout) -> int:
    """`--max-tokens auto`: the largest of `budget_candidates` for which the trainer's memory plan
    (`plan_for_config`) of every variant (packing, recompute, compile, old log-probs) fits the trainer's share for
    `auto` budgets (`memory_plan.plan_fits_margin`) of this device's usable memory, packed
    with that many tokens per micro-batch and padded with budget // max_new_tokens sequences; the smallest where
    none fits or nothing is known of the device (CPU without --memory-gib). Tiny CPU runs: 40 tokens."""
    if args.tiny:
        return 40
    fits = _plans_fit(args, shape, variants, layout)
    candidates = budget_candidates(args)
    return next((budget for budget in candidates if fits(budget, None)), candidates[-1])


def auto_logprob_budget(args, shape: dict, variants: list[tuple[bool, str, bool, str]], layout: Layout,
                        budget: int) -> int:
    """`--logprob-max-tokens auto`: the largest of `budget_candidates`, not below the training `budget`, for which
    every variant's memory plan fits (as auto_token_budget) with the forward-only passes at that size; `budget` where
    none larger fits. Tiny CPU runs: 80 tokens."""
    if args.tiny:
        return 80
    fits = _plans_fit(args, shape, variants, layout)
    return next((size for size in budget_candidates(args) if size >= budget and fits(budget, size)), budget)


def _plans_fit(args, shape: dict, variants: list[tuple[bool, str, bool, str]], layout: Layout):
    """fits(budget, logprob_tokens): whether every variant's memory plan fits at those sizes
    (`memory_plan.plan_fits_margin`); False when nothing is known of the device (CPU without --memory-gib)."""
    device = comm_device()
    capacity = usable_device_bytes(device, args.memory_gib)
    config = ModelConfig(**shape, hf_extra={"eos_token_id": EOS_ID})
    per_dp = max(1, args.prompts // layout.dp)

    def fits(budget: int, logprob_tokens: int | None) -> bool:
        if capacity is None:
            return False
        for packing, recompute, compile_layers, old_logprobs in variants:
            cfg = trainer_config(args, per_dp, packing, recompute, compile_layers, old_logprobs, budget,
                                 padded_micro_batch(args, budget), logprob_tokens)
            if not plan_fits_margin(cfg, config, layout, device, 2, capacity):
                return False
        return True

    return fits


def padded_micro_batch(args, budget: int | None) -> int:
    """Sequences per padded micro-batch: budget // max_new_tokens with `--max-tokens auto` (the packed runs'
    token budget in sequences of the longest response), else --micro-batch."""
    return max(1, budget // args.max_new_tokens) if args.max_tokens == "auto" else args.micro_batch


def run_layout(args, tp: int, pp: int, shape: dict | None = None, packing: bool | None = None,
               recompute: str | None = None, compile_layers: bool = False, old_logprobs: str | None = None,
               max_tokens: int | None = None, warmup_compiled: bool | None = None,
               logprob_tokens: int | None = None, pad_to_multiple_of: int = 1) -> dict:
    """Build actor + trainer for one layout, run the steps, return mean phase timings and throughput.

    max_tokens: the packed token budget (default --max-tokens; 'auto' is resolved here for this run alone);
    logprob_tokens: the forward-only passes' (default --logprob-max-tokens; 'auto' resolved as max_tokens);
    pad_to_multiple_of: trainer.pad_to_multiple_of (padded runs: each batch's width rounded up to a multiple);
    warmup_compiled: run the compiled runs' extra warm-up step (default: when this run compiles). An A/B gives every
    variant the same warm-up steps, so that their measured steps draw the same prompts and response lengths."""
    layout = Layout.create(tp, pp)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    shape = shape or (TINY if args.tiny else SHAPES[args.shape])
    packing = (args.packing == "on") if packing is None else packing
    recompute, compile_layers = recompute or args.recompute, compile_layers or args.compile
    old_logprobs = old_logprobs or args.old_logprobs
    if max_tokens is None:
        max_tokens = args.max_tokens
        if max_tokens == "auto":
            max_tokens = auto_token_budget(args, shape, [(packing, recompute, compile_layers, old_logprobs)], layout)
    if logprob_tokens is None:
        logprob_tokens = args.logprob_max_tokens
        if logprob_tokens == "auto":
            logprob_tokens = auto_logprob_budget(args, shape, [(packing, recompute, compile_layers, old_logprobs)],
                                                 layout, max_tokens or budget_candidates(args)[-1])
    retries_before, start_allocated = alloc_retries(), None
    if torch.cuda.is_available():
        gc.collect()
        # what earlier runs of this process left allocated (after they returned): part of this run's peak
        start_allocated = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    actor = build_actor(shape, layout, dtype)
    per_dp = max(1, args.prompts // layout.dp)
    cfg = trainer_config(args, per_dp, packing, recompute, compile_layers, old_logprobs, max_tokens,
                         padded_micro_batch(args, max_tokens), logprob_tokens)
    cfg.trainer.pad_to_multiple_of = pad_to_multiple_of
    trainer = PPOTrainer(actor, reward_fn=even_token_reward, config=cfg)
    for model in (actor.model, trainer.reference.model if trainer.reference is not None else None):
        for layer in (model.layers if model is not None else ()):
            layer.self_attn.varlen_kernel = args.varlen_kernel
    force_lengths(trainer, parse_length_range(args.response_len, args.max_new_tokens), eos_token_id=EOS_ID)
    record: list[dict] = []
    stages = trainer.pipeline.stages
    at = trainer.pipeline.names().index("rollout") + 1
    stages = stages[:at] + [record_lengths_stage(record)] + ([_free_graphs(trainer.worker)] if args.recapture else []) \
        + stages[at:]
    at = [getattr(s, "name", None) for s in stages].index("update")
    update_peaks: list[float] = []
    trainer.pipeline = Pipeline(stages[:at] + [_reset_peak] + [stages[at]] + [_record_peak(update_peaks)]
                                + stages[at + 1:])
    gen = torch.Generator().manual_seed(1000 + layout.dp_rank)
    vocab = actor.config.vocab_size
    history, profiled_steps = [], []
    # compiled layers: one more warm-up step (a graph first met after step 1, e.g. a micro-batch of one sequence,
    # compiles there), then as many measured steps as the others (as throughput.py)
    extra = int(cfg.model.compile if warmup_compiled is None else warmup_compiled)
    for step in range(args.steps + extra):
        samples = [{"prompt_ids": torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist()}
                   for _ in range(per_dp)]
        profiled = step + 1 == args.profile_step
        graphs, gpu = dynamo_graphs(), torch.cuda.current_device() if args.device == "cuda" else None
        with GCPauses() as pauses, GPUClocks(gpu) as clocks, HostUse() as host, TritonCompiles() as compiles:
            metrics = profile_step(trainer, samples, args.out) if profiled else trainer.step(samples)
        metrics["host"], metrics["compiled_graphs"] = host.summary, dynamo_graphs() - graphs
        metrics["triton_compiles"] = compiles.names
        metrics["time/gc"], metrics["gc/full_collections"] = sum(pauses.seconds), pauses.count[2]
        metrics["gpu_clocks"] = clocks.summary()
        if step >= args.warmup + extra:
            metrics["update_flops"] = update_flops(actor.config, actor.model, record[-1])
            metrics["batch_width"] = record[-1]["width"]
            (profiled_steps if profiled else history).append(metrics)
        elif step + 1 == args.warmup + extra:
            # the warm-up's garbage (compiled graphs' temporaries, the first steps' objects) goes with the warm-up,
            # as its compiles do: left, it pushed Python's next full collection (0.5 s at the 1.5B shape, compiled)
            # into a measured step; the measured steps keep Python's automatic collections (the GC columns)
            gc.collect()
    history = history or profiled_steps  # a profiled step is slower: in the means only when it is the only one
    result = {"layout": {"tp": tp, "pp": pp, "dp": layout.dp, "tp_g": trainer.worker.tp_g},
              "prompts_per_step": per_dp * layout.dp, "responses_per_step": per_dp * layout.dp * args.n,
              "packing": cfg.trainer.packing, "recompute": cfg.model.recompute,
              "pad_to_multiple_of": cfg.trainer.pad_to_multiple_of,
              "old_logprobs_pass": not update_takes_own_logprobs(cfg),
              "max_tokens_per_micro_batch": cfg.trainer.max_tokens_per_micro_batch,
              "micro_batch_size": cfg.trainer.micro_batch_size, "warmup_steps": args.warmup + extra,
              "logprob_max_tokens_per_micro_batch": cfg.trainer.logprob_max_tokens_per_micro_batch,
              "logprob_micro_batch_size": cfg.trainer.logprob_micro_batch_size}
    for key in [f"time/{p}" for p in PHASES] + ["time/graph_capture", "time/gc", "time/step",
                                                 "throughput/tokens_per_s_per_gpu",
                                                 "throughput/gen_tokens_per_s_per_gpu", "response_length/mean",
                                                 "update_flops"]:
        result[key] = statistics.mean(m.get(key, 0.0) for m in history) if history else None
    # each measured step's phase times: a later step faster than the first shows one-time compiles still in it
    # with the update's TFLOP/s and the GPU's clocks during the step (a slower step at the same TFLOP count and a
    # lower SM clock is the card's doing, not the program's)
    result["per_step"] = [{**{p: m.get(f"time/{p}") for p in ("generate", "graph_capture", "logprob", "update", "step",
                                                              "gc")}, "gc_full_collections": m["gc/full_collections"],
                           "update_tflops": m["update_flops"] / m["time/update"] / 1e12 / (tp * pp),
                           "batch_width": m["batch_width"],
                           "gpu_clocks": m["gpu_clocks"], "host": m["host"], "compiled_graphs": m["compiled_graphs"],
                           "triton_compiles": m["triton_compiles"]}
                          for m in history]
    if history:  # per GPU: this rank's model shard runs 1 / (tp * pp) of its replica's FLOPs
        tflops = statistics.mean(m["update_flops"] / m["time/update"] for m in history) / 1e12 / (tp * pp)
        result["update_tflops_per_gpu"] = tflops
        peak = peak_tflops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
        result["update_mfu"] = tflops / peak if peak else None
    hybrid = getattr(trainer.worker.weights, "hybrid", None)  # None: pp = 1, tp_g = tp (weights used in place)
    stats = hybrid.last_stats if hybrid is not None else None
    result["reshard_bytes_moved_per_rank"] = stats.bytes_moved if stats is not None else 0
    result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    result["update_peak_memory_gib"] = max(update_peaks) if update_peaks and torch.cuda.is_available() else None
    # the caching allocator's retries (free every cached block, synchronize, allocate again): a run close to the
    # card's memory pays them in wall time, which shows as step-to-step spread
    result["cuda_alloc_retries"] = alloc_retries() - retries_before if torch.cuda.is_available() else None
    result["max_memory_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None
    result.update(memory_report(trainer))
    if result["max_memory_gib"]:
        result["plan_error"] = (result["plan_peak_gib"] - result["max_memory_gib"]) / result["max_memory_gib"]
    result["start_allocated_gib"] = start_allocated
    del trainer, actor
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def profile_step(trainer, samples, out_dir: str, name: str = "grpo_e2e_profile.txt", top: int = 40) -> dict:
    """One trainer step under torch.profiler; writes the ops/kernels with the most GPU time and the
    most host (self) time, with call counts, and each stage's GPU idle time by cause (profile_gaps.py),
    to out_dir/name (rank 0)."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                    if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=acts) as prof:
        metrics = trainer.step(samples)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    if dist.get_rank() == 0:
        avg = prof.key_averages()
        lines = ["# stages (ms): the host range's wall time and the GPU time of the kernels it launched (CUDA-graph "
                 "replays not attributed); the GPU-side span of the same range (its first to last kernel)"]
        lines += [f"{e.cpu_time_total / 1e3:9.1f}  {e.device_time_total / 1e3:9.1f}  {e.key}"
                  if e.device_type == torch.autograd.DeviceType.CPU else
                  f"{'':9}  {e.device_time_total / 1e3:9.1f}  {e.key} (GPU span)"
                  for e in avg if e.key.startswith("stage/")]
        lines += ["", "# GPU time by op / kernel (ms, calls; ops include their kernels)"]
        lines += [f"{e.device_time_total / 1e3:9.1f}  {e.count:7d}x  {e.key[:120]}"
                  for e in sorted(avg, key=lambda e: -e.device_time_total)[:top]]
        lines += ["", "# host self time (ms, calls)"]
        lines += [f"{e.self_cpu_time_total / 1e3:9.1f}  {e.count:7d}x  {e.key[:120]}"
                  for e in sorted(avg, key=lambda e: -e.self_cpu_time_total)[:top // 2]]
        try:  # the analysis reads the profiler's raw events, whose API moves between torch versions
            lines += [""] + stage_report(from_profiler(prof))
        except Exception as exc:  # noqa: BLE001 - the tables above are still worth writing
            lines += ["", f"# GPU idle analysis failed: {type(exc).__name__}: {exc}"]
        lines += ["", "# step metrics (under the profiler)", json.dumps({k: v for k, v in metrics.items()
                                                                        if k.startswith(("time/", "throughput/"))})]
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return metrics


def markdown(results: list[dict], args, world: int, device: str) -> str:
    shape = "tiny" if args.tiny else f"Qwen2.5-{args.shape.upper()} shape, bf16"
    lines = [f"# GRPO end-to-end step ({shape}, {world} x {device})", "",
             f"{args.prompts} prompts x {args.n} responses per step, prompt {args.prompt_len} tokens, "
             f"up to {args.max_new_tokens} new tokens; mean of {len(results[0]['per_step'])} measured steps after "
             f"{results[0]['warmup_steps']} warm-up.", "",
             "| layout (tp x pp x dp, tp_g) | generate s | reshard s | logprob s | update s | step s "
             "| tokens/s/GPU | gen tokens/s/GPU |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lay = r["layout"]
        cells = [f"{r[f'time/{p}']:.3f}" for p in PHASES] + [f"{r['time/step']:.3f}",
                 f"{r['throughput/tokens_per_s_per_gpu']:.0f}", f"{r['throughput/gen_tokens_per_s_per_gpu']:.0f}"]
        lines.append(f"| {lay['tp']}x{lay['pp']}x{lay['dp']}, tp_g={lay['tp_g']} | " + " | ".join(cells) + " |")
    lines += ["", "| layout | offload | peak GPU GiB (update) | planned GiB (phase) | host peak GiB | planned host GiB |",
              "|---|---|---|---|---|---|"]
    for r in results:
        lay, gpu = r["layout"], "-"
        if r["max_memory_gib"] is not None:
            gpu = f"{r['max_memory_gib']:.1f} ({r['update_peak_memory_gib']:.1f})"
        off = ",".join(k for k, v in r["offload"].items() if v) or "none"
        lines.append(f"| {lay['tp']}x{lay['pp']}x{lay['dp']} | {off} | {gpu} | {r['plan_peak_gib']:.2f} "
                     f"({r['plan_peak_phase']}) | {r['host_peak_rss_gib']:.1f} | {r['plan_host_gib']:.1f} |")
    lines += ["", "Planner tables:", ""] + ["```\n" + r["plan_table"] + "\n```" for r in results]
    return "\n".join(lines) + "\n"


def ab_budgets(args, shape: dict, variants: list[str], variant: str) -> tuple:
    """One A/B run's (--max-tokens, --logprob-max-tokens), `auto` resolved (tp = pp = 1): the largest that every
    variant's plan fits (--ab-budget shared) or `variant`'s alone (own)."""
    planned = [variant_spec(v)[0] for v in (variants if args.ab_budget == "shared" else [variant])]
    budget = args.max_tokens
    if budget == "auto":
        budget = auto_token_budget(args, shape, planned, Layout.create(1, 1))
    logprob_budget = args.logprob_max_tokens
    if logprob_budget == "auto":
        logprob_budget = auto_logprob_budget(args, shape, planned, Layout.create(1, 1),
                                             budget if isinstance(budget, int) else budget_candidates(args)[-1])
    return budget, logprob_budget


def run_ab(args, world: int, device_name: str) -> None:
    """Every variant of VARIANTS for every shape of --ab, one after the other in this process (tp = pp = 1)."""
    results = []
    variants = args.variants.split(",")
    compiled = any(variant_spec(v)[0][2] for v in variants) or args.compile  # every variant warms up alike (run_layout)
    shapes = {name: TINY if name == "tiny" or args.tiny else SHAPES[name] for name in args.ab.split(",")}
    # every run's budgets planned before the first run: the device's free memory, which the plans read, is lower
    # after a run (kernels loaded, library workspaces), so a later variant would plan against less than an earlier
    # one (session 29: the packed run's forward-only budget fell from 65,536 to 8,192 tokens in a "shared" A/B)
    budgets = {(name, v): ab_budgets(args, shape, variants, v) for name, shape in shapes.items() for v in variants}
    for shape_name, shape in shapes.items():
        for variant in variants:
            (packing, recompute, compile_layers, old_logprobs), multiple = variant_spec(variant)
            budget, logprob_budget = budgets[shape_name, variant]
            r = run_layout(args, 1, 1, shape=shape, packing=packing, recompute=recompute,
                           compile_layers=compile_layers, old_logprobs=old_logprobs, max_tokens=budget,
                           warmup_compiled=compiled, logprob_tokens=logprob_budget, pad_to_multiple_of=multiple)
            r.update(shape=shape_name, variant=variant)
            results.append(r)
            if dist.get_rank() == 0:
                print(json.dumps(r), flush=True)
    if dist.get_rank() == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "grpo_e2e_ab.json"), "w") as f:
            json.dump({"device": device_name, "world_size": world, "args": vars(args), "results": results}, f, indent=2)
        text = ab_markdown(results, args, world, device_name)
        with open(os.path.join(args.out, "grpo_e2e_ab.md"), "w") as f:
            f.write(text)
        print(text)
    dist.barrier()
    dist.destroy_process_group()


def ab_markdown(results: list[dict], args, world: int, device_name: str) -> str:
    budgets = "per row, update / forward-only passes"
    budgets += " (--max-tokens auto" + (", each variant its own)" if args.ab_budget == "own" else ")") \
        if args.max_tokens == "auto" else ""
    if args.logprob_max_tokens is not None:
        budgets += f" (--logprob-max-tokens {args.logprob_max_tokens})"
    lines = [f"# GRPO step, packed vs padded ({world} x {device_name})", "",
             f"{args.prompts} prompts x {args.n}, prompt {args.prompt_len} tokens, response lengths "
             f"{args.response_len or 'as generated'} (max_new_tokens {args.max_new_tokens}); micro-batches: "
             + budgets + f". Mean of {len(results[0]['per_step'])} steps after {results[0]['warmup_steps']} warm-up "
             "(every variant alike: their measured steps see the same prompts and response lengths).",
             "Update FLOPs = 6 x (params except LM head) x tokens + 6 x (LM head) x response tokens + "
             "12 x layers x heads x head_dim x sum(len^2) / 2 (recompute not counted); MFU against "
             f"{peak_tflops(device_name) or '(no figure for this card)'} dense bf16 TFLOP/s.", "",
             "| shape | variant | micro-batch | tokens/s/GPU | vs the shape's first variant | per step (min-max) | "
             "logprob s | update s | update TFLOP/s | update MFU | update peak GiB | run peak GiB | "
             "planned peak GiB (vs run peak) | allocator retries | GC pause s (full collections) | "
             "graphs compiled per step | Triton kernels compiled per step | SM MHz per step (slowdown) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base, base_steps = {}, {}
    for r in results:
        tps = r["throughput/tokens_per_s_per_gpu"]
        base.setdefault(r["shape"], tps)
        # the same step's wall time, first variant over this one (their steps see the same prompts and lengths)
        steps = [s["step"] for s in r["per_step"]]
        ratios = [b / s for b, s in zip(base_steps.setdefault(r["shape"], steps), steps)]
        mfu = f"{100 * r['update_mfu']:.1f}%" if r.get("update_mfu") else "-"
        mem = " | ".join(f"{r[k]:.1f}" if r[k] is not None else "-" for k in ("update_peak_memory_gib", "max_memory_gib"))
        if r.get("start_allocated_gib"):  # earlier runs' leftovers, inside both peaks
            mem += f" (at start {r['start_allocated_gib']:.1f})"
        mem += f" | {r['plan_peak_gib']:.1f}" + (f" ({100 * r['plan_error']:+.1f}%)" if r.get("plan_error") is not None
                                                 else "")
        train, forward = (("max_tokens_per_micro_batch", "logprob_max_tokens_per_micro_batch") if r["packing"]
                          else ("micro_batch_size", "logprob_micro_batch_size"))  # forward unset: the update's size
        size = f"{r[train]} / {r[forward] or r[train]} " + ("tokens" if r["packing"] else "sequences")
        retries = "-" if r.get("cuda_alloc_retries") is None else r["cuda_alloc_retries"]
        full_collections = sum(s["gc_full_collections"] for s in r["per_step"])
        clocks = [s.get("gpu_clocks") for s in r["per_step"]]
        sm = "/".join(f"{c['sm_mhz_mean']:.0f}" if c else "-" for c in clocks) or "-"
        slowdown = sorted({name for c in clocks if c for name in c["slowdown"]})
        sm += f" ({', '.join(slowdown) or 'none'})" if any(clocks) else ""
        lines.append(f"| {r['shape']} | {r['variant']} | {size} | {tps:.0f} | {tps / base[r['shape']]:.2f}x | "
                     f"{min(ratios):.2f}-{max(ratios):.2f}x | {r['time/logprob']:.3f} | {r['time/update']:.3f} | "
                     f"{r['update_tflops_per_gpu']:.1f} | {mfu} | {mem} | {retries} | {r['time/gc']:.3f} "
                     f"({full_collections}) | {'/'.join(str(s['compiled_graphs']) for s in r['per_step'])} | "
                     f"{'/'.join(str(len(s['triton_compiles'])) for s in r['per_step'])} | {sm} |")
    # the measured steps' padded width (prompt + longest response; the same steps for every variant of a shape)
    # (variants with trainer.pad_to_multiple_of > 1: their own widths, after the shape's name)
    widths = {r["shape"] + (f" @{r['pad_to_multiple_of']}" if r.get("pad_to_multiple_of", 1) > 1 else ""):
              "/".join(str(s["batch_width"]) for s in r["per_step"]) for r in results}
    lines += ["", "Padded width per measured step (prompt + longest response): "
              + "; ".join(f"{shape} {w}" for shape, w in widths.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    init_distributed(backend="gloo" if args.device == "cpu" else None)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no GPU is visible; use --device cpu --tiny for a CPU check")
    world, device_name = dist.get_world_size(), (torch.cuda.get_device_name() if args.device == "cuda" else "cpu")
    if args.ab:
        return run_ab(args, world, device_name)
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
