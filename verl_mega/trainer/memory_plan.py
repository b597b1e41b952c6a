"""Memory planner: per-GPU bytes of an RL run by component and phase, checked before anything is allocated.

    plan = plan_memory(model_config, Parallelism(tp, pp, dp), Workload(...), offload, param_bytes=2, reference=True)
    print(plan.table())                 # rank 0
    plan.check(capacity_bytes)          # MemoryPlanError (a ValueError) naming the knobs that would make it fit

Components (bytes on one GPU, for the pipeline stage that needs the most):
- weights: the stage's parameters (param dtype); rollout adds the inference copy's extra when
  generation gathers more than the training shard (tp_g < tp or pp > 1).
- grads: the fp32 `main_grad` buffer (4 B/param); during rollout 0 with `offload.grads` (hand-over).
- optimizer: fp32 masters (4 B/param for bf16 params; fp32 params are their own masters) + Adam
  moments (8 B/param), divided over dp (ZeRO-1); 0 with `offload.optimizer` (host memory instead:
  12 B/param / dp, plus the host step's pinned staging buffers).
- reference: the frozen reference's weights; with `offload.reference` only the resident embedding /
  head plus two streamed layers (the one running and the prefetched one).
- activations: what autograd saves for one micro-batch of `micro_batch_size` x `seq_len` tokens
  (padded; with packing the token budget and no mask), times the micro-batches in flight on the stage
  under 1F1B (pp - stage), plus one layer's worth of backward workspace; with `model.recompute`
  "selective" the attention core's output and silu(gate) are recomputed, with "full" only each layer's
  input is kept (on the first `model.recompute_layers` layers of the stage; the table also reports the figure
  with every layer recomputed); `model.compile` changes what the norms and the MLP keep.
- logprob_chunk: the fused log-prob kernel's extra buffer, min(EXTRA_BYTES, [N, V_local] fp32 + [N, H] fp32)
  for N response tokens of a micro-batch.
- kv_cache: 2 x layers x min(rows x round_up(seq_len, 64), rollout.engine.max_tokens) x kv_heads/tp_g
  x head_dim x param bytes; plus
  prefill activations of one layer for `prefill_tokens` tokens and the [rows, V] fp32 logits buffers.

Saved activations per token per layer of our decoder (`activation_bytes_per_token_layer`; b = param bytes,
h = hidden, h' = q heads x head_dim / tp, h_kv' = kv heads x head_dim / tp, I' = intermediate / tp), as
autograd's saved-tensor hooks count them (tests/trainer/test_memory_plan.py counts them on CPU for every mode):
- two RMSNorms: eager, each keeps its fp32 input copy, the rsqrt, the normalised bf16 tensor and its
  weighted output (4h + 4 + 2bh); compiled (`model.compile`), inductor keeps the input, the rsqrt and the
  output (2bh + 4);
- attention: rotated q, K/V expanded to the query heads, the kernel's output and its reshaped copy (the
  o_proj input; 5 b h') and the fp32 log-sum-exp; "selective": q, k, v (the recomputed core's inputs, K/V not
  expanded), the o_proj input and the copy: 3 b h' + 2 b h_kv'. The copy (b h') is what CUDA runs keep beyond
  the CPU count: CPU kernels return the output in the layout the reshape wants. It is fitted to the GPU, not
  derived: with it, the plans of nine H100 runs lie within -0.8% to +5.2% of their measured peaks
  (benchmarks/results/h100_2026-12-07f: padded, packed, compiled, each recompute mode);
- SwiGLU: gate, silu, up and their product, 4 b I'; compiled, silu is recomputed (3 b I'); "selective"
  recomputes silu (3 b I', compiled 2 b I').
The additive attention mask [mb, 1, S, S] (its rows padded: `masks.bias_row`) is kept once per micro-batch.

Phases: rollout (weights + KV cache + training state unless handed over + reference),
logprob (forward-only passes of actor and reference: one layer's forward activations at a time),
update (weights + grads + optimizer + activations + log-prob chunk + reference if resident); logprob and update
also hold the generation engine's buffers (its [rows, V] fp32 logits and its decode CUDA graphs' memory,
kept between rollouts) and the KV cache when it is kept between rollouts (`keep_kv_cache`).
Simplifications: allocator fragmentation is not modelled (callers keep `headroom`); the critic is
counted as a second actor when present (its update's activations in its own recompute mode, the larger of the two
updates' taken).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from verl_mega.kernels.logprob import EXTRA_BYTES
from verl_mega.models.masks import bias_row
from verl_mega.models.parallelize import stage_layer_range
from verl_mega.parallel.zero import DEFAULT_OFFLOAD_BUCKET_NUMEL
from verl_mega.trainer.batch import padded_response_width

log = logging.getLogger(__name__)
GIB = 2**30
KV_SLOT_MULTIPLE = 64  # the rollout rounds cache lengths up to this many slots
DEFAULT_HEADROOM = 0.08  # fraction of the device kept free for fragmentation, CUDA context, NCCL buffers
AUTO_TOKEN_BUDGETS = (65536, 32768, 16384, 8192, 4096, 2048, 1024)  # "auto" token budgets' candidates, largest first
# "auto" token budgets keep the plan within this share of the usable memory: plan errors against the measured peak
# (max allocated) on H100s ran from -17% to +19% (benchmarks/results/h100_2026-12-06c, -06d; throughput.py's
# 0.5B runs in -05d, -05e). The activation model counted since (module docstring) put nine update peaks
# (h100_2026-12-07f: 0.5B / 1.5B, padded, packed, compiled, each recompute mode) within -0.8% to +5.2%; the
# margin stays, as the other phases' plans were not re-measured.
AUTO_BUDGET_MARGIN = 0.8


def _fmt(nbytes: float) -> str:
    """Bytes as GiB (or MiB below 1 GiB) for messages."""
    return f"{nbytes / GIB:.2f} GiB" if abs(nbytes) >= GIB else f"{nbytes / 2**20:.2f} MiB"


class MemoryPlanError(ValueError):
    """The planned peak exceeds the device memory; the message names the knobs that would make it fit."""


@dataclass(frozen=True)
class Parallelism:
    """Training layout sizes (tp_g: generation tensor-parallel size, None = tp)."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    tp_g: int | None = None


@dataclass(frozen=True)
class Workload:
    """The shapes that set activation and cache memory (per data-parallel rank)."""

    micro_batch_size: int  # sequences per forward/backward
    seq_len: int  # padded tokens per sequence (prompt + response)
    response_len: int  # response tokens per sequence (rows of the log-prob kernel)
    rollout_rows: int  # sequences decoded together (min(rows, rollout.engine.max_batch))
    num_microbatches: int = 1  # micro-batches per optimizer step (bounds those in flight)
    prefill_tokens: int = 16384  # rollout prefill slice (rollout.engine.prefill_tokens)
    kv_token_budget: int | None = None  # the paged KV cache's token cap (rollout.engine.max_tokens); None: no cap
    recompute: str = "none"  # model.recompute: none | selective | full
    recompute_layers: int | None = None  # model.recompute_layers: "full" on the first K layers of a stage; None: all
    critic_recompute: str | None = None  # model.critic_recompute; None: as `recompute`
    compiled: bool = False  # model.compile: the norms and the MLP keep less (activation_bytes_per_token_layer)
    packed: bool = False  # trainer.packing: micro-batches hold valid tokens only (no [S, S] mask, no padding)
    tokens_per_microbatch: int | None = None  # trainer.max_tokens_per_micro_batch (packed); None: mb x seq_len
    logprob_micro_batch_size: int | None = None  # sequences per forward-only pass; None: micro_batch_size
    logprob_tokens_per_microbatch: int | None = None  # token budget of a forward-only pass (packed); None: as training
    keep_kv_cache: bool = False  # the KV cache stays allocated through training (rollout.free_cache false)


@dataclass(frozen=True)
class Offload:
    """Which components live in host memory (the `offload` config section's switches)."""

    optimizer: bool = False
    reference: bool = False
    grads: bool = False


@dataclass
class MemoryPlan:
    """Per-GPU estimate: `phases[phase][component]` bytes; `peak` over phases; `host` bytes off the GPU."""

    phases: dict[str, dict[str, int]]
    host: dict[str, int]
    recompute_activations: int
    offload: Offload
    stage: int
    keep_kv_cache: bool = False  # the KV cache (and the engine's CUDA graphs) stays allocated through training

    @property
    def peak(self) -> int:
        """Bytes of the phase with the most memory."""
        return max(sum(c.values()) for c in self.phases.values())

    @property
    def peak_phase(self) -> str:
        """Name of the phase with the most memory."""
        return max(self.phases, key=lambda p: sum(self.phases[p].values()))

    def table(self, capacity: int | None = None) -> str:
        """Aligned text table: components x phases (GiB, or MiB for a small plan), the peak, host memory
        and the capacity."""
        unit, scale = ("GiB", GIB) if self.peak >= GIB else ("MiB", 2**20)
        comps = list(dict.fromkeys(c for p in self.phases.values() for c in p))
        o = self.offload
        lines = [f"memory plan per GPU (pipeline stage {self.stage}; {unit}) offload: optimizer={o.optimizer} "
                 f"reference={o.reference} grads={o.grads}",
                 f"{'component':<22}" + "".join(f"{p:>10}" for p in self.phases)]
        for c in comps:
            lines.append(f"{c:<22}" + "".join(f"{self.phases[p].get(c, 0) / scale:>10.2f}" for p in self.phases))
        lines.append(f"{'total':<22}" + "".join(f"{sum(v.values()) / scale:>10.2f}" for v in self.phases.values()))
        host = ", ".join(f"{k} {v / scale:.2f}" for k, v in self.host.items() if v) or "none"
        lines.append(f"peak {self.peak / scale:.2f} {unit} ({self.peak_phase}); activations with full recompute would "
                     f"be {self.recompute_activations / scale:.2f} {unit}; host {sum(self.host.values()) / scale:.2f} "
                     f"{unit} ({host})")
        if capacity is not None:
            lines.append(f"device {capacity / scale:.2f} {unit} usable")
        return "\n".join(lines)

    def fits(self, capacity: int, host_capacity: int | None = None) -> bool:
        """Whether the peak is within `capacity` bytes (and the offloaded state within `host_capacity`)."""
        return self.peak <= capacity and (host_capacity is None or sum(self.host.values()) <= host_capacity)

    def check(self, capacity: int, host_capacity: int | None = None) -> None:
        """MemoryPlanError naming the knobs when the peak exceeds `capacity` bytes or the offloaded
        state exceeds `host_capacity` bytes of host memory."""
        host = sum(self.host.values())
        if host_capacity is not None and host > host_capacity:
            knobs = [f"offload.{k}=false ({_fmt(v)})" for k, v in self.host.items()
                     if v and k in ("reference", "optimizer")]
            raise MemoryPlanError(
                f"the offloaded state does not fit in host memory: {_fmt(host)} > {_fmt(host_capacity)} "
                f"available. Try: " + "; ".join(knobs + ["more GPUs: a larger data-parallel size shards the "
                                                           "offloaded optimizer state"]) + ".\n" + self.table(capacity))
        if self.peak <= capacity:
            return
        phase = self.phases[self.peak_phase]
        knobs = []
        if not self.offload.optimizer and phase.get("optimizer", 0):
            knobs.append(f"offload.optimizer=true (frees {_fmt(phase['optimizer'])})")
        if not self.offload.reference and phase.get("reference", 0):
            knobs.append(f"offload.reference=true (frees most of {_fmt(phase['reference'])})")
        if not self.offload.grads and self.peak_phase == "rollout" and phase.get("grads", 0):
            knobs.append(f"offload.grads=true (frees {_fmt(phase['grads'])} during rollout)")
        if phase.get("activations", 0):
            knobs.append(f"model.recompute=full (activations {_fmt(phase['activations'])} -> "
                         f"{_fmt(self.recompute_activations)}) or a smaller trainer.micro_batch_size / "
                         f"max_tokens_per_micro_batch")
        if phase.get("kv_cache", 0):
            knobs.append(f"a smaller rollout.engine.max_batch / max_tokens (KV cache {_fmt(phase['kv_cache'])})")
        knobs.append("more GPUs: a larger parallel.tp / parallel.pp (weights, grads and activations split)")
        raise MemoryPlanError(
            f"the run does not fit: planned peak {_fmt(self.peak)} in the {self.peak_phase} phase > "
            f"{_fmt(capacity)} usable device memory. Try: " + "; ".join(knobs) + ".\n" + self.table(capacity))


# ---------------------------------------------------------------------------------------------- counting
def layer_params(cfg, tp: int) -> int:
    """Parameters of one decoder layer on one tp rank."""
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if cfg.attention_bias else 0)
    mlp = 3 * h * cfg.intermediate_size
    norms = 2 * h + (2 * d if getattr(cfg, "qk_norm", False) else 0)
    return (attn + mlp) // tp + norms


def vision_params(vision) -> int:
    """Parameters of a Qwen2.5-VL vision tower (`VisionConfig`; replicated: the same on every tp rank): the
    Conv3d patch embedding, `depth` blocks (2 RMSNorms, fused qkv + proj with biases, SwiGLU MLP with biases)
    and the merger (RMSNorm, two linears with biases over spatial_merge_size^2 concatenated patches)."""
    h, i, m2 = vision.hidden_size, vision.intermediate_size, vision.spatial_merge_size ** 2
    patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2 * h
    block = 2 * h + (3 * h * h + 3 * h) + (h * h + h) + (2 * h * i + 2 * i) + (i * h + h)
    merger = h + (h * m2 * h * m2 + h * m2) + (h * m2 * vision.out_hidden_size + vision.out_hidden_size)
    return patch + vision.depth * block + merger


def stage_params(cfg, tp: int, pp: int, stage: int, value_head: bool = False) -> tuple[int, int]:
    """(parameters of the stage's layers, of the rest: embedding / final norm / head; a VLM's vision tower
    on the first stage) on one tp rank."""
    start, end = stage_layer_range(cfg.num_layers, pp, stage)
    vocab_rows = cfg.padded_vocab_size(tp) // tp * cfg.hidden_size
    rest = vocab_rows if stage == 0 else 0
    if stage == 0 and getattr(cfg, "vision", None) is not None:
        rest += vision_params(cfg.vision)
    if stage == pp - 1:
        rest += cfg.hidden_size
        if value_head:
            rest += cfg.hidden_size + 1
        elif not (cfg.tie_word_embeddings and pp == 1):
            rest += vocab_rows
    return (end - start) * layer_params(cfg, tp), rest


def activation_bytes_per_token_layer(cfg, tp: int, b: int, recompute: str = "none", compiled: bool = False) -> int:
    """Bytes autograd keeps per token and layer with `recompute` "none" or "selective" and eager or compiled
    layers (module docstring; "full" keeps only the layer input, see plan_memory)."""
    h = cfg.hidden_size
    hq = cfg.num_heads * cfg.head_dim // tp
    hkv = cfg.num_kv_heads * cfg.head_dim // tp
    inter = cfg.intermediate_size // tp
    selective = recompute == "selective"
    norms = 2 * ((2 * b * h + 4) if compiled else (4 * h + 4 + 2 * b * h))
    attention = (3 * b * hq + 2 * b * hkv) if selective else (5 * b * hq + 4 * (cfg.num_heads // tp))
    mlp = (4 - int(compiled) - int(selective)) * b * inter
    return norms + attention + mlp


def forward_bytes_per_token_layer(cfg, tp: int, b: int) -> int:
    """Peak transient bytes per token of one layer's forward without autograd (normed input, q/k/v,
    attention output, gate/up/product)."""
    h = cfg.hidden_size
    hq = cfg.num_heads * cfg.head_dim // tp
    return b * (2 * h + 4 * hq) + 4 * h + 3 * b * cfg.intermediate_size // tp


# ---------------------------------------------------------------------------------------------- the plan
def plan_memory(cfg, par: Parallelism, work: Workload, offload: Offload, *, param_bytes: int, reference: bool,
                critic: bool = False, stage: int | None = None) -> MemoryPlan:
    """The plan of pipeline stage `stage` (default: the stage with the highest peak). cfg: a ModelConfig."""
    if stage is None:
        plans = [plan_memory(cfg, par, work, offload, param_bytes=param_bytes, reference=reference, critic=critic,
                             stage=s) for s in range(par.pp)]
        return max(plans, key=lambda p: p.peak)
    tp, b = par.tp, param_bytes
    layers, rest = stage_params(cfg, tp, par.pp, stage)
    p_stage = layers + rest
    n_layers = len(range(*stage_layer_range(cfg.num_layers, par.pp, stage)))
    models = 2 if critic else 1
    weights = models * p_stage * b
    grads = models * p_stage * 4
    optimizer = models * (p_stage * (8 + (4 if b != 4 else 0))) // par.dp
    host = {"optimizer": models * p_stage * 12 // par.dp if offload.optimizer else 0}  # separate fp32 masters
    if offload.optimizer:  # + the step's pinned staging: 2 x (fp32 grads + param dtype) of the largest bucket
        largest = cfg.padded_vocab_size(tp) // tp * cfg.hidden_size if (stage in (0, par.pp - 1)) else 0
        host["offload_staging"] = 2 * max(min(DEFAULT_OFFLOAD_BUCKET_NUMEL, p_stage // par.dp), largest) * (4 + b)
        optimizer = 0
    ref = p_stage * b if reference else 0
    if reference and offload.reference:
        host["reference"] = layers * b
        ref = rest * b + 2 * (layers // max(1, n_layers)) * b

    tokens = work.tokens_per_microbatch or work.micro_batch_size * work.seq_len
    in_flight = min(par.pp - stage, work.num_microbatches)
    whole_layer = activation_bytes_per_token_layer(cfg, tp, b, "none", work.compiled)
    mask = 0 if work.packed else work.micro_batch_size * work.seq_len * bias_row(work.seq_len) * b
    ends = tokens * (b * cfg.hidden_size + (4 + b) * cfg.hidden_size * (stage == par.pp - 1))  # embedding / final norm

    def activations_of(mode: str, full_layers: int | None) -> int:
        """What autograd keeps on this stage in `mode`, for the micro-batches in flight, plus one layer's backward
        workspace; "full" recomputes the first `full_layers` layers of the stage (None: all of them)."""
        if mode == "full":
            full = n_layers if full_layers is None else min(full_layers, n_layers)
            kept = tokens * (full * b * cfg.hidden_size + (n_layers - full) * whole_layer)
            return in_flight * (kept + mask + ends) + tokens * whole_layer
        per_layer = activation_bytes_per_token_layer(cfg, tp, b, mode, work.compiled)
        return in_flight * (tokens * per_layer * n_layers + mask + ends) + tokens * per_layer

    recompute = activations_of("full", None)  # the table's what-if: every layer recomputed
    activations = activations_of(work.recompute, work.recompute_layers)
    if critic:  # its update runs after the actor's, with its own recompute mode
        activations = max(activations, activations_of(work.critic_recompute or work.recompute, work.recompute_layers))
    n_resp = work.micro_batch_size * work.response_len
    v_local = cfg.padded_vocab_size(tp) // tp

    def logprob_chunk(n: int) -> int:  # the fused log-prob kernel's chunk of n response rows
        return min(EXTRA_BYTES, n * v_local * 4 + n * cfg.hidden_size * 4) if stage == par.pp - 1 else 0

    chunk = logprob_chunk(n_resp)
    logprob_io = n_resp * cfg.hidden_size * (b + 4) if stage == par.pp - 1 else 0  # hidden slice + its fp32 grad

    tp_g = par.tp_g or tp
    rows = work.rollout_rows
    slots = -(-work.seq_len // KV_SLOT_MULTIPLE) * KV_SLOT_MULTIPLE
    kv_tokens = rows * slots if work.kv_token_budget is None else min(rows * slots, work.kv_token_budget)
    kv = 2 * cfg.num_layers * kv_tokens * (cfg.num_kv_heads // tp_g) * cfg.head_dim * b
    inference_extra = 0
    if tp_g != tp or par.pp > 1:
        full_layers, full_rest = stage_params(cfg, tp_g, 1, 0)
        inference_extra = max(0, (full_layers + full_rest - p_stage) * b)
    prefill_tok = min(work.prefill_tokens, rows * work.seq_len)
    rollout_act = (prefill_tok * forward_bytes_per_token_layer(cfg, tp_g, b)
                   + 4 * rows * cfg.padded_vocab_size(tp_g))  # the [rows, V] fp32 logits + sampling copies
    handed = offload.grads
    train_state = {"grads": 0 if handed else grads, "optimizer": 0 if handed else optimizer}
    fwd_mb = work.logprob_micro_batch_size or work.micro_batch_size  # the forward-only passes' micro-batch
    fwd_tokens = work.logprob_tokens_per_microbatch or work.tokens_per_microbatch or fwd_mb * work.seq_len
    fwd_mask = 0 if work.packed else fwd_mb * work.seq_len * bias_row(work.seq_len) * b
    fwd = fwd_tokens * forward_bytes_per_token_layer(cfg, tp, b) + fwd_mask + fwd_tokens * cfg.hidden_size * b * 2

    # held by the generation engine between rollouts: its [rows, V] fp32 logits buffer and the private memory of
    # its decode CUDA graphs (kept across rollouts: a decode step's head output [rows, V] and one layer's transients)
    engine = (4 + b) * rows * cfg.padded_vocab_size(tp_g) // tp_g + rows * forward_bytes_per_token_layer(cfg, tp_g, b)
    phases = {
        "rollout": {"weights": weights + inference_extra, **train_state, "reference": ref, "kv_cache": kv,
                    "activations": rollout_act},
        "logprob": {"weights": weights, "grads": grads, "optimizer": optimizer, "reference": ref,
                    "activations": fwd, "logprob_chunk": logprob_chunk(fwd_mb * work.response_len), "engine": engine},
        "update": {"weights": weights, "grads": grads, "optimizer": optimizer, "reference": ref,
                   "activations": activations + logprob_io, "logprob_chunk": chunk, "engine": engine},
    }
    if work.keep_kv_cache:  # not freed after the rollout: training runs beside it
        phases["logprob"]["kv_cache"] = phases["update"]["kv_cache"] = kv
    return MemoryPlan(phases=phases, host=host, recompute_activations=recompute, offload=offload, stage=stage,
                      keep_kv_cache=work.keep_kv_cache)


def auto_offload(cfg, par: Parallelism, work: Workload, *, param_bytes: int, reference: bool, capacity: int,
                 critic: bool = False, host_capacity: int | None = None) -> Offload:
    """The fewest offload switches (in the order grads, reference, optimizer: cheapest first) whose plan
    fits `capacity` (and `host_capacity`); all of them if none does (the caller's `check` then reports)."""
    order = [Offload(), Offload(grads=True), Offload(grads=True, reference=True),
             Offload(optimizer=True, grads=True), Offload(optimizer=True, reference=True, grads=True)]
    for choice in order:
        plan = plan_memory(cfg, par, work, choice, param_bytes=param_bytes, reference=reference, critic=critic)
        if plan.fits(capacity, host_capacity):
            return choice
    return order[-1]


def usable_device_bytes(device, memory_gib: float | None = None, headroom: float = DEFAULT_HEADROOM) -> int | None:
    """Bytes the plan may use: `memory_gib` if given, else the CUDA device's free memory
    (`torch.cuda.mem_get_info`) plus what this process's allocator already holds (the plan counts
    the weights already loaded), less `headroom`; None on CPU without an override (nothing to check)."""
    import torch

    if memory_gib is not None:
        if memory_gib <= 0:
            raise ValueError(f"memory_gib must be positive, got {memory_gib}")
        return int(memory_gib * GIB * (1 - headroom))
    if torch.device(device).type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int((free + torch.cuda.memory_reserved(device)) * (1 - headroom))  # what this process holds counts as usable


def usable_host_bytes(headroom: float = 0.1) -> int | None:
    """Host memory the offloaded state may take: MemAvailable (Linux /proc/meminfo) less `headroom`,
    divided by the processes on this node (LOCAL_WORLD_SIZE ranks share it); None where unknown."""
    import os

    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    return int(kib * 1024 * (1 - headroom)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def plan_for_config(cfg, model_config, layout, device, param_bytes: int) -> tuple[Offload, MemoryPlan]:
    """Plan a `TrainerConfig` run before its engines are built: the offload switches (the config's, or
    with `offload.auto` the planner's choice) and the plan. With `offload.plan`, when there is a
    capacity to plan against (`offload.memory_gib`, or the CUDA device's memory) a peak above it raises
    MemoryPlanError with the table in its message (so does offloaded state beyond the available host
    memory), and a plan that fits has its table printed by rank 0; without one (CPU) the table is only logged.
    `plan.keep_kv_cache` says whether the rollout's KV cache stays allocated through training: the config's
    `rollout.free_cache` false, or with free_cache null (auto) when generation runs on the training weights
    (tp_g = tp, pp = 1) with the gather decode attention (whose CUDA graphs a freed cache would invalidate) and
    the plan with the cache kept fits the capacity with the same offload switches (never without a capacity,
    e.g. on CPU)."""
    t, r, o = cfg.trainer, cfg.rollout, cfg.offload
    # padded rows: the widest batch, its width rounded as RLBatch.set_rollout rounds it
    response_len = r.max_new_tokens if t.packing else padded_response_width(cfg.data.max_prompt_length,
                                                                            r.max_new_tokens, t.pad_to_multiple_of)
    seq = cfg.data.max_prompt_length + response_len
    rows_per_update = (t.mini_batch_size or t.rollout_batch_size) * r.n_samples
    packed_budget = t.max_tokens_per_micro_batch if t.packing else None
    work = Workload(micro_batch_size=t.micro_batch_size, seq_len=seq, response_len=response_len,
                    rollout_rows=min(t.rollout_batch_size * r.n_samples, r.engine.max_batch),
                    num_microbatches=-(-rows_per_update // t.micro_batch_size),
                    prefill_tokens=r.engine.prefill_tokens, kv_token_budget=r.engine.max_tokens,
                    recompute=cfg.model.recompute, recompute_layers=cfg.model.recompute_layers,
                    critic_recompute=cfg.model.critic_recompute, compiled=cfg.model.compile, packed=t.packing,
                    tokens_per_microbatch=packed_budget,
                    logprob_micro_batch_size=t.logprob_micro_batch_size,
                    logprob_tokens_per_microbatch=t.logprob_max_tokens_per_micro_batch if t.packing else None,
                    keep_kv_cache=r.free_cache is False)
    par = Parallelism(layout.tp, layout.pp, layout.dp, cfg.parallel.tp_g)
    reference, critic = cfg.algorithm.kl_coef > 0, cfg.algorithm.name in ("ppo", "gae")
    capacity = usable_device_bytes(device, o.memory_gib) if (o.plan or o.auto) else None
    host_capacity = usable_host_bytes() if capacity is not None else None
    if o.auto and capacity is not None:
        choice = auto_offload(model_config, par, work, param_bytes=param_bytes, reference=reference,
                              capacity=capacity, critic=critic, host_capacity=host_capacity)
    else:
        choice = Offload(optimizer=o.optimizer, reference=o.reference, grads=o.grads)
    plan = plan_memory(model_config, par, work, choice, param_bytes=param_bytes, reference=reference, critic=critic)
    resharded = (par.tp_g or par.tp) != par.tp or par.pp > 1  # generation on regathered weights: new addresses
    # each rollout, so the engine (and its graphs) is rebuilt anyway and keeping its cache would only hold memory;
    # the paged kernels' CUDA graphs survive a freed cache (engine.release), so keeping it there gains nothing
    # either (a 1.5B GRPO step on an H100: 17.33 s kept, 17.48 s freed; results/h100_2026-12-06c)
    attention = r.engine.decode_attention(str(device).startswith("cuda"))
    if r.free_cache is None and capacity is not None and not resharded and attention == "gather":  # auto: keep
        kept = plan_memory(model_config, par, replace(work, keep_kv_cache=True), choice, param_bytes=param_bytes,
                           reference=reference, critic=critic)  # only where that needs no further offload
        if kept.fits(capacity, host_capacity):
            plan = kept
    if o.plan and capacity is not None:
        plan.check(capacity, host_capacity)  # a plan that does not fit: the table is in the error, printed once
    if o.plan and layout.rank == 0:
        if capacity is None:
            log.info("%s", plan.table())
        else:
            print(plan.table(capacity), flush=True)
    return choice, plan


def plan_fits_margin(cfg, model_config, layout, device, param_bytes: int, capacity: int) -> bool:
    """Whether `cfg`'s memory plan, with the offload switches it names (no auto choice, nothing printed or raised),
    fits AUTO_BUDGET_MARGIN of `capacity` bytes: the test behind every automatic size (`auto_token_budgets`, the
    benchmarks' `auto`)."""
    quiet = replace(cfg, offload=replace(cfg.offload, plan=False, auto=False))
    return plan_for_config(quiet, model_config, layout, device, param_bytes)[1].fits(int(capacity * AUTO_BUDGET_MARGIN))


def auto_token_budgets(cfg, model_config, layout, device, param_bytes: int) -> tuple[int | None, int | None]:
    """`trainer.max_tokens_per_micro_batch` and `trainer.logprob_max_tokens_per_micro_batch` with "auto" resolved
    (other values returned as they are). The training budget: the largest of AUTO_TOKEN_BUDGETS, not below one
    whole sequence (max_prompt_length + max_new_tokens), whose memory plan fits AUTO_BUDGET_MARGIN of the usable
    device memory (`usable_device_bytes`) with the offload switches the config names (offload.auto never has to
    offload more for it); the forward-only budget: the largest, not below the training budget, that fits with it.
    None fits: the smallest candidate, so that the plan check names the knobs. No capacity known (CPU without
    offload.memory_gib): micro_batch_size (logprob_micro_batch_size) whole sequences. With torch.distributed
    initialised every rank takes the world's smallest (ranks of one pipeline must cut the same micro-batches)."""
    import torch
    import torch.distributed as dist

    t = cfg.trainer
    train, forward = t.max_tokens_per_micro_batch, t.logprob_max_tokens_per_micro_batch
    if "auto" not in (train, forward):
        return train, forward
    seq = cfg.data.max_prompt_length + cfg.rollout.max_new_tokens
    capacity = usable_device_bytes(device, cfg.offload.memory_gib)

    def fits(budget: int, forward_budget: int | None) -> bool:
        trial = replace(cfg, trainer=replace(t, max_tokens_per_micro_batch=budget,
                                             logprob_max_tokens_per_micro_batch=forward_budget))
        return plan_fits_margin(trial, model_config, layout, device, param_bytes, capacity)

    def largest(low: int, fits_at, fallback: int) -> int:
        if capacity is None:
            return fallback
        sizes = [size for size in AUTO_TOKEN_BUDGETS if size >= low] or [low]
        return next((size for size in sizes if fits_at(size)), sizes[-1])

    if train == "auto":
        train = largest(seq, lambda size: fits(size, None if forward == "auto" else forward), t.micro_batch_size * seq)
    if forward == "auto":
        forward = largest(max(seq, train or seq), lambda size: fits(train, size),
                          (t.logprob_micro_batch_size or t.micro_batch_size) * seq)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        sizes = torch.tensor([-1 if v is None else v for v in (train, forward)], dtype=torch.long, device=device)
        dist.all_reduce(sizes, op=dist.ReduceOp.MIN)  # None stays None: every rank has the same config
        train, forward = (None if v < 0 else v for v in sizes.tolist())
    log.info("token budgets per micro-batch (auto): training %s, forward-only %s (capacity %s)", train, forward,
             "unknown" if capacity is None else _fmt(capacity))
    return train, forward
