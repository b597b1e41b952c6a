"""Rollout service benchmark: the continuous-batching engine (paged KV cache, prefix sharing) against the
static engine (`benchmarks/static_engine.py`) in the same process, plus transformers' `generate`, plus a
GRPO step with a slow reward, streaming vs after generation.

    python benchmarks/rollout_service.py            # GPU: Qwen2.5-0.5B and 7B shapes, random bf16 weights
    python benchmarks/rollout_service.py --smoke    # CPU: tiny shape, few prompts (checks the script end to end)

Workload (per shape): `--prompts` (64) random prompts of `--prompt-len` (128) tokens x `--n` (8) samples;
every response ends with EOS at a length drawn uniformly from [--min-len, --max-len] = [32, 1024]
(seeded). Random weights almost never choose EOS themselves (about once per vocabulary-size tokens, which ends
that row early: the new engine's token count can fall a few hundred short of the drawn total; tokens/s counts the
tokens generated), so the EOS is forced through the engine's `eos_at`
hook (`forced_lengths.py`: same work as a model that stops there: the row is freed after it, its slot
taken by a waiting request).
- new engine: all requests added at once (`max_batch` rows in flight, `--max-batch`, default all), with
  the gather + SDPA decode attention ("new"), the Triton paged-attention kernel ("new_paged"), that kernel with
  the one-pass Triton sampler ("new_paged_fused", `rollout/fused_sampling.py`: the CUDA defaults), that
  with 16 decode steps per host check instead of 8 ("new_paged_fused_sync16"), that with each window
  read right after its launch ("new_paged_fused_no_lookahead", `look_ahead=False`: the host's bookkeeping
  no longer overlaps decoding), that with the q/k/v and gate/up weights each on its own storage
  ("new_paged_fused_unstacked": separate GEMMs instead of one per stacked group, `DecoderLayer.stack_projections`),
  and that with each window of 8 steps and their sampling replayed as one CUDA
  graph ("new_paged_fused_window", `cuda_graph_window=True`); `--variants` picks some;
- static engine: one batch of prompts x n rows with max_new_tokens = the longest drawn length and
  EOS ignored: how it runs this workload (a finished row keeps its slot and is decoded until the
  whole batch ends; its extra tokens are not counted);
- transformers: `generate` at batch `--hf-batch` (64) for `--hf-new-tokens` tokens (EOS ignored).
Tokens/s counts the drawn lengths (useful tokens) over the wall time of one call (prefill included),
after a warm-up call with the same workload (captures the CUDA graphs). `row_step_ceiling` = rows x
longest length / sum of lengths: the new/static ratio if a row-step (one row through one decode step)
cost both engines the same (all rows fit at once here, so the new engine's only saving is the rows it
stops decoding; 1.97 for the seeded draw from [32, 1024]). Beyond it only a cheaper row-step helps (attention
over live context only; larger batches when rows wait).

Bandwidth bound of a decode step (7B, reported for both shapes): a step must read every weight
matrix once (all parameters except the input embedding table, of which it reads b rows) and the
K/V of every attended token:  t_bound = sum over steps of (W + C_step * kv_bytes) / BW, with
W = weight bytes, C_step = tokens attended in that step summed over its rows (engine counter
`decode_context_tokens`), kv_bytes = layers * 2 * kv_heads * head_dim * dtype bytes, and BW both
the card's spec (H200 HBM3e 4.8 TB/s, H100 SXM HBM3 3.35 TB/s) and the device-to-device copy
bandwidth measured here (2 * bytes / time of a 4 GiB copy). Fraction = t_bound / t_decode with
t_decode = (new engine call) - (a prefill-only call of the same requests, max_new_tokens=1).
`roofline_spec` (all rows in flight): per step the longer of that memory time and the compute time at the
card's dense bf16 peak (989 TFLOP/s), see `roofline_bound`: large decode batches of a 7B model are compute-bound.

GRPO step (0.5B shape, or tiny with --smoke): PPOTrainer on the saved random model, reward = sleep
`--reward-ms` (50) per response; one step with streaming rewards and one with rewards after
generation (same seed, same forced lengths), after a warm-up step. Hidden fraction =
1 - (reward stage time, streaming) / (reward stage time, after generation).

Writes $OUT/rollout_service.json (or --out-dir) and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import tempfile
import time

import torch

if "--smoke" in sys.argv:  # CPU: Triton kernels (the paged attention) in the interpreter; set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")
_HERE = os.path.dirname(os.path.abspath(__file__))
# this directory holds kernels.py, which would shadow the `kernels` package transformers imports
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
_spec = importlib.util.spec_from_file_location("bench_generation", os.path.join(_HERE, "generation.py"))
_generation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_generation)
SHAPES, build_hf, build_ours_random, time_call, graph_seconds = (
    _generation.SHAPES, _generation.build_hf, _generation.build_ours_random, _generation.time_call,
    _generation.graph_seconds)

from benchmarks.forced_lengths import ForcedLengthWorker, draw_lengths  # noqa: E402
from verl_mega.rollout.engine import GenerationEngine  # noqa: E402
from verl_mega.rollout.engine_config import EngineConfig  # noqa: E402
from verl_mega.rollout.sampling import SamplingParams  # noqa: E402
from verl_mega.rollout.scheduler import RequestParams  # noqa: E402
from benchmarks.static_engine import StaticGenerationEngine  # noqa: E402
from benchmarks import gpu_specs  # noqa: E402
from verl_mega.rollout.worker import RolloutWorker  # noqa: E402

EOS = 1  # hf_config's eos_token_id


# the new engine's variants (EngineConfig fields): decode attention, sampler, decode steps per host check
VARIANTS = {"new": {"attention": "gather", "sampler": "torch"},
            "new_paged": {"attention": "paged", "sampler": "torch"},
            "new_paged_fused": {"attention": "paged", "sampler": "fused"},
            "new_paged_fused_sync16": {"attention": "paged", "sampler": "fused", "sync_every": 16},
            "new_paged_fused_no_lookahead": {"attention": "paged", "sampler": "fused", "look_ahead": False},
            "new_paged_fused_unstacked": {"attention": "paged", "sampler": "fused", "stacked": False},
            "new_paged_fused_step8": {"attention": "paged", "sampler": "fused", "graph_batch_step": 8},
            "new_paged_fused_step32": {"attention": "paged", "sampler": "fused", "graph_batch_step": 32},
            "new_paged_fused_step64": {"attention": "paged", "sampler": "fused", "graph_batch_step": 64},
            "new_paged_fused_cublaslt": {"attention": "paged", "sampler": "fused", "blas": "cublaslt"},
            "new_paged_fused_step8_cublaslt": {"attention": "paged", "sampler": "fused", "graph_batch_step": 8,
                                               "blas": "cublaslt"},
            "new_paged_fused_window": {"attention": "paged", "sampler": "fused", "cuda_graph_window": True}}


def workload(args, vocab: int) -> tuple[list[list[int]], list[int]]:
    """(prompts, per-row response lengths), seeded."""
    gen = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(2, vocab, (args.prompts, args.prompt_len), generator=gen).tolist()
    return prompts, draw_lengths(args.prompts * args.n, (args.min_len, args.max_len), args.seed + 1)


def run_new(args, shape: str, model, prompts, lengths, tp_group, name: str = "new", **engine: str | int | bool
            ) -> dict:
    """Continuous batching at `shape`: tokens/s, the decode time (call - prefill-only call) and the engine counters.
    name: the variant (the profile's file name part); engine: its EngineConfig fields (attention, sampler, ...)."""
    rows = len(prompts) * args.n
    config = EngineConfig(max_batch=args.max_batch or rows, max_seq_len=args.prompt_len + args.max_len + 64,
                          max_tokens=args.max_tokens or rows * (args.prompt_len + args.max_len + 64),
                          block_size=args.block_size, kv_len_bucket=args.kv_len_bucket, **engine)
    engine = GenerationEngine(model, tp_group, config, eos_token_ids=[EOS], pad_token_id=0)
    sampling = SamplingParams(temperature=1.0)

    box: list[int] = []

    def call(max_new: int | None = None):
        engine.seed(0)
        for i, p in enumerate(prompts):
            engine.add_request(p, RequestParams(sampling, max_new or args.max_len, args.n), ignore_eos=True,
                               eos_at=lengths[i * args.n:(i + 1) * args.n])  # only the forced EOS ends a row
        got = 0
        while engine.has_unfinished():
            got += sum(len(d.token_ids) for d in engine.step())
        return got

    warm = time_call(call)
    engine.stats = dict.fromkeys(engine.stats, 0)
    seconds = time_call(lambda: box.append(call()))
    got, stats = box[-1], dict(engine.stats)
    prefill = time_call(lambda: call(1))
    out = {"seconds": seconds, "first_call_seconds": warm, "tokens": got, "tokens_per_s": got / seconds,
           "prefill_only_seconds": prefill, "decode_seconds": seconds - prefill, "graphs": len(engine._graphs),
           "kv_pool_gib": engine.cache.memory_bytes() / 2**30, "preemptions": engine.scheduler.preemptions,
           "sync_every": engine.sync_every, "look_ahead": config.look_ahead, "attention": engine.attention,
           "sampler": engine.sampler, **stats}
    if args.profile:
        out["profile"] = profile = profile_call(call, os.path.join(args.out_dir, f"rollout_profile_{name}.txt"))
        weights, kv_bytes = decode_bytes(shape, model)
        kinds = profile["device_s_by_kind"]
        if kinds.get("gemm"):  # decode + prefill matmuls (prefill: 2-3% of the rows here)
            params = weights / next(model.parameters()).element_size()
            rows_total = stats["decode_rows"] + stats["prefill_tokens"]
            profile["gemm_tflops"] = 2 * params * rows_total / kinds["gemm"] / 1e12
        if kinds.get("attention"):
            profile["attention_bytes_per_s"] = stats["decode_context_tokens"] * kv_bytes / kinds["attention"]
    if args.step_curve:
        out["step_curve"] = step_curve(engine, shape, model, [int(r) for r in args.step_curve.split(",")],
                                       args.curve_context, spec_bandwidth(engine.device), peak_flops(engine.device))
    engine.release()
    return out


def profile_call(call, path: str) -> dict:
    """One more call under torch.profiler: where its wall time goes. Device busy fraction = summed device
    kernel time / wall time (kernels do not overlap on one stream: 1 - fraction is the device idle share, e.g.
    the host scheduling between decode windows); the top ops by device and by host self time go to `path`."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        wall = time_call(call)
    events = prof.key_averages()
    device_s = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e6
    tables = [events.table(sort_by=key, row_limit=25) for key in ("self_device_time_total", "self_cpu_time_total")
              if torch.cuda.is_available() or key == "self_cpu_time_total"]
    with open(path, "w") as f:
        f.write("\n\n".join(tables))
    top = sorted(events, key=lambda e: -getattr(e, "self_device_time_total", 0))[:10]
    by_kind: dict[str, float] = {}
    for e in events:
        if not e.key.startswith(("aten::", "cuda")):  # device kernels and copies, not host ops or runtime calls
            kind = kernel_kind(e.key)
            by_kind[kind] = by_kind.get(kind, 0.0) + getattr(e, "self_device_time_total", 0) / 1e6
    return {"wall_s": wall, "device_kernel_s": device_s, "device_busy_fraction": device_s / wall,
            "device_s_by_kind": {k: round(v, 4) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]) if v},
            "top_device_ops": [(e.key[:80], round(getattr(e, "self_device_time_total", 0) / 1e6, 4)) for e in top],
            "tables": path}


KERNEL_KINDS = (  # (kind, name fragments), first match wins: where a decode rollout's device time goes
    ("attention", ("paged_decode", "merge_splits", "flash", "fmha", "attention")),
    ("kv_write", ("paged_write", "index_put", "scatter")),
    ("sampling", ("sample_", "argmax", "multinomial", "softmax", "exponential")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm80_", "cublas", "splitk")),  # splitK: its reduction
    ("norm", ("rms_norm",)),
    ("rope", ("rope",)),
    ("silu_mul", ("silu",)),
    ("copy", ("copy", "memcpy", "memset", "cat")),
)


def kernel_kind(name: str) -> str:
    """The kind of a device kernel by its name (`KERNEL_KINDS`); "elementwise" / "other" for the rest."""
    low = name.lower()
    for kind, parts in KERNEL_KINDS:
        if any(part in low for part in parts):
            return kind
    return "elementwise" if ("elementwise" in low or "vectorized" in low or "reduce" in low) else "other"


def step_curve(engine, shape: str, model, rows_list: list[int], context: int, bw: float | None,
               peak: float | None, repeats: int = 20) -> list[dict]:
    """Milliseconds per decode step (the CUDA-graph replay, and replay + the fused sampling of the engine's
    window loop) at `rows_list` rows, every row attending over `context` tokens of its own blocks (fixed
    contents: timing only), against the step's memory bound (weights + rows x context x kv bytes at `bw`)
    and compute bound (2 x matmul params x rows at `peak`)."""
    weights, kv_bytes = decode_bytes(shape, model)
    params = weights / next(model.parameters()).element_size()
    per_row = -(-(context + 1) // engine.block_size)
    out = []
    for rows in rows_list:
        if rows > engine.max_batch or rows * per_row >= engine.cache.num_blocks:
            continue
        blocks = 1 + torch.arange(rows * per_row, device=engine.device).view(rows, per_row)
        engine._tables[:rows].zero_()
        engine._tables[:rows, :per_row] = blocks
        engine._positions[:rows] = context
        engine._tokens[:rows] = 2
        nb = engine.table_width

        def replay():
            engine._decode(rows, nb)
            engine._positions[:rows] = context  # the step graph reads positions; keep them fixed

        def with_sampling():
            engine._decode_steps(rows, 1, lambda: engine._decode(rows, nb), {SamplingParams(temperature=1.0): None},
                                 False, False)
            engine._positions[:rows] = context

        replay()  # captures the graph
        with_sampling()  # compiles the sampler's kernels for this row count
        row = {"rows": rows, "context": context,
               "replay_ms": 1e3 * time_call(lambda: [replay() for _ in range(repeats)]) / repeats,
               "step_ms": 1e3 * time_call(lambda: [with_sampling() for _ in range(repeats)]) / repeats}
        if bw:
            row["memory_bound_ms"] = 1e3 * (weights + rows * (context + 1) * kv_bytes) / bw
        if peak:
            row["compute_bound_ms"] = 1e3 * 2 * params * rows / peak
        if bw and peak:
            row["fraction_of_roofline"] = max(row["memory_bound_ms"], row["compute_bound_ms"]) / row["step_ms"]
        out.append(row)
    return out


def run_static(args, model, prompts, lengths, tp_group) -> dict:
    rows = len(prompts) * args.n
    engine = StaticGenerationEngine(model, tp_group, max_batch=rows, max_seq_len=args.prompt_len + args.max_len + 64,
                                    eos_token_ids=[EOS], pad_token_id=0)
    kw = dict(max_new_tokens=max(lengths), temperature=1.0, n=args.n, ignore_eos=True)
    warm = time_call(lambda: engine.generate(prompts, seed=0, **kw))
    seconds = time_call(lambda: engine.generate(prompts, seed=1, **kw))
    out = {"seconds": seconds, "first_call_seconds": warm, "tokens": sum(lengths),
           "tokens_per_s": sum(lengths) / seconds, "decoded_row_tokens": rows * max(lengths)}
    engine.release()
    return out


def run_hf(args, shape, device, dtype) -> dict:
    model = build_hf(shape, device, dtype)
    prompts = torch.randint(2, SHAPES[shape]["vocab_size"], (args.hf_batch, args.prompt_len), device=device)
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=EOS)
    with torch.no_grad():
        model.generate(prompts, max_new_tokens=4, min_new_tokens=4, **kw)
        seconds = time_call(lambda: model.generate(prompts, max_new_tokens=args.hf_new_tokens,
                                                   min_new_tokens=args.hf_new_tokens, **kw))
    del model
    return {"batch": args.hf_batch, "new_tokens": args.hf_new_tokens, "seconds": seconds,
            "tokens_per_s": args.hf_batch * args.hf_new_tokens / seconds}


def copy_bandwidth(device) -> float | None:
    """Device-to-device copy bandwidth (bytes read + written per second) of a 4 GiB buffer."""
    if device.type != "cuda":
        return None
    src = torch.empty(2**31, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), repeats=5)
    del src, dst
    return 2 * 2**32 / seconds


def spec_bandwidth(device) -> float | None:
    """The card's nominal memory bandwidth in bytes/s (`gpu_specs.spec_bandwidth`); None for a card not listed
    there. On CPU the H100's figure, so the smoke run exercises the bound (its fraction means nothing)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "H100 80GB HBM3"
    return gpu_specs.spec_bandwidth(name)


def decode_bytes(shape, model) -> tuple[int, int]:
    """(weight bytes a decode step reads: every parameter but the untied input embedding table, of which it reads
    b rows, bytes of K/V per attended token) of the module docstring's bound."""
    cfg = SHAPES[shape]
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    itemsize = next(model.parameters()).element_size()
    kv_bytes = cfg["num_hidden_layers"] * 2 * cfg["num_key_value_heads"] * head_dim * itemsize
    embed = 0 if cfg["tie_word_embeddings"] else model.embed_tokens.weight.numel() * itemsize
    return sum(p.numel() * p.element_size() for p in model.parameters()) - embed, kv_bytes


def bandwidth_bound(shape, model, new: dict, bw: float) -> dict:
    """The decode-step bound of the module docstring, as a fraction of the measured decode time."""
    weights, kv_bytes = decode_bytes(shape, model)
    total = new["decode_steps"] * weights + new["decode_context_tokens"] * kv_bytes
    t_bound = total / bw
    return {"bandwidth_bytes_per_s": bw, "weight_bytes": weights, "kv_bytes_per_token": kv_bytes,
            "bound_seconds": t_bound, "fraction_of_bound": t_bound / max(new["decode_seconds"], 1e-9)}


def peak_flops(device) -> float | None:
    """The card's dense bf16 tensor-core peak in FLOP/s (`gpu_specs.peak_flops`); on CPU the
    H100's figure, as `spec_bandwidth`, so the smoke run exercises the roofline (its fraction means nothing)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "H100"
    return gpu_specs.peak_flops(name)


def roofline_bound(shape, model, new: dict, lengths: list[int], args, bw: float, peak: float) -> dict:
    """A tighter bound than `bandwidth_bound` where decode batches are large: per decode step the longer of its
    memory time (weights + attended K/V at `bw`) and its compute time (2 x matmul params x rows + attention
    4 x layers x q heads x head_dim x attended tokens, at the dense bf16 `peak`), summed over steps. The rows of
    each step are re-derived from the forced lengths (all rows admitted at once, a row decoding until the host
    check after its last token, and one look-ahead window more where that is on, as the engine does), so it holds
    for runs with every row in flight (`--max-batch` 0) only; `rows_match` says whether the re-derived row-steps
    equal the engine's counter."""
    cfg = SHAPES[shape]
    weights, kv_bytes = decode_bytes(shape, model)
    matmul_params = weights / next(model.parameters()).element_size()
    attn_flops = 4 * cfg["num_hidden_layers"] * cfg["hidden_size"]  # per attended token (q heads x head_dim = hidden)
    k = new["sync_every"]
    # decode steps of each row: its first token comes from prefill, the rest in windows of k, and the window launched
    # before the host reads that it ended (the engine's look-ahead) decodes it once more
    ahead = k if new["look_ahead"] else 0
    steps = [-(-(n - 1) // k) * k + ahead for n in lengths]
    total, row_steps, compute_bound_steps = 0.0, 0, 0
    for t in range(max(steps)):
        live = sum(s > t for s in steps)
        context = live * (args.prompt_len + 1 + t)  # tokens attended, the fed token included
        memory = (weights + context * kv_bytes) / bw
        compute = (2 * matmul_params * live + attn_flops * context) / peak
        total += max(memory, compute)
        row_steps += live
        compute_bound_steps += compute > memory
    return {"peak_flops": peak, "bandwidth_bytes_per_s": bw, "bound_seconds": total,
            "fraction_of_bound": total / max(new["decode_seconds"], 1e-9),
            "compute_bound_steps": compute_bound_steps, "steps": max(steps),
            "rows_match": row_steps == new["decode_rows"], "row_steps": row_steps}


def parity_check(device) -> dict:
    """Tiny fp32 model on `device`: the new engine's greedy tokens (CUDA graphs, 4 rows for 8 prompts of
    mixed lengths, host check every 4 steps) == transformers' greedy generate, exactly."""
    from verl_mega.rollout import get_actor_model

    hf = build_hf("tiny", device, torch.float32)
    path = tempfile.mkdtemp(prefix="rollout_parity_")
    hf.save_pretrained(path)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 1000, (int(n),), generator=gen).tolist() for n in torch.randint(3, 20, (8,), generator=gen)]
    p_len, new = max(map(len, prompts)), 24
    ids = torch.tensor([[0] * (p_len - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (p_len - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new, eos_token_id=EOS,
                          pad_token_id=0, top_k=None, top_p=None, temperature=None)[:, p_len:].tolist()
    ref = [row[:row.index(EOS) + 1] if EOS in row else row for row in out]
    actor = get_actor_model(path, device=device)
    actor.model.fused_inference = device.type == "cuda"
    engine = GenerationEngine(actor.model, None, EngineConfig(max_batch=4, max_seq_len=64, block_size=4,
                                                               kv_len_bucket=16, sync_every=4),
                              eos_token_ids=[EOS], pad_token_id=0)
    got = engine.generate(prompts, max_new_tokens=new, temperature=0.0).responses()
    return {"equal": got == ref, "rows_equal": sum(a == b for a, b in zip(got, ref)), "rows": len(ref),
            "graphs": len(engine._graphs), "preemptions": engine.scheduler.preemptions}


ATTENTION_CONFIGS = ((False, 4, 1, 2), (True, 4, 1, 2), (True, 4, 2, 2), (True, 4, 3, 2), (True, 4, 4, 2),
                     (True, 8, 2, 2), (True, 8, 3, 2), (True, 2, 2, 2), (True, 4, 2, 4), (True, 4, 2, 8),
                     (True, 4, 2, 16))  # (pipelined `for` loop, num_warps, num_stages, MIN_PROGRAMS_PER_SM); the
# first: `while`; the last three split the context deeper (more programs per SM at few rows)


def attention_sweep_table(shape: str, device: str, sweep: list[dict]) -> str:
    """`attention_sweep`'s entries as a markdown table: a launch configuration per line, a row count per column,
    microseconds per call and K/V read in GB/s."""
    keys = ("pipelined", "num_warps", "num_stages", "min_programs_per_sm")
    configs = list(dict.fromkeys(tuple(e[k] for k in keys) for e in sweep))
    rows = sorted({e["rows"] for e in sweep}, reverse=True)
    cell = {(tuple(e[k] for k in keys), e["rows"]): e for e in sweep}
    lines = [f"\n## Paged decode attention, {shape} heads, one layer ({device}): us per call (K/V read GB/s)\n",
             "| pipelined, warps, stages, programs per SM | " + " | ".join(f"{r} rows" for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for c in configs:
        got = [cell[c, r] for r in rows]
        lines.append(f"| {', '.join(str(v) for v in c)} | " + " | ".join(
            f"{e['us']:.1f} ({e['bytes_per_s'] / 1e9:.0f})" if "us" in e else "error" for e in got) + " |")
    return "\n".join(lines) + "\n"


def attention_sweep(shape: str, device, dtype, rows_list=(512, 256, 128, 64, 32, 16), lengths=(160, 1152),
                    repeats: int = 20
                    ) -> list[dict]:
    """The paged decode-attention kernel alone at `shape`'s heads, one layer: bytes of K/V read per second for each
    launch configuration of `ATTENTION_CONFIGS`, at each row count, rows' lengths uniform in `lengths` (seeded),
    blocks scattered over the pool as a long rollout leaves them, `repeats` calls in one CUDA graph. The first
    configuration is the kernel before the pipelined loop."""
    from verl_mega.rollout import paged_attention as pa

    cfg = SHAPES[shape]
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, bs = cfg["hidden_size"] // hq, 16
    gen = torch.Generator().manual_seed(0)
    saved = (pa.PIPELINE, pa.NUM_WARPS, pa.NUM_STAGES, pa.MIN_PROGRAMS_PER_SM)
    out = []
    try:
        for rows in rows_list:
            pos = torch.randint(lengths[0], lengths[1], (rows,), generator=gen)
            nb = -(-lengths[1] // bs) + 1
            slots = rows * nb * bs + bs
            tables = (1 + torch.randperm(rows * nb, generator=gen)).view(rows, nb)
            k_pool = torch.randn(slots, hkv, d, generator=gen).to(device, dtype)
            v_pool = torch.randn(slots, hkv, d, generator=gen).to(device, dtype)
            q = torch.randn(rows, hq, d, generator=gen).to(device, dtype)
            tables, pos = tables.to(device), pos.to(device)
            addresses = pa.pool_addresses(k_pool, v_pool)  # once: built per call it is a host-to-device copy
            kv_bytes = int((pos + 1).sum()) * hkv * d * 2 * k_pool.element_size()
            ref = None
            for pipelined, warps, stages, depth in ATTENTION_CONFIGS:
                pa.PIPELINE, pa.NUM_WARPS, pa.NUM_STAGES, pa.MIN_PROGRAMS_PER_SM = pipelined, warps, stages, depth
                launch = {"rows": rows, "pipelined": pipelined, "num_warps": warps, "num_stages": stages,
                          "min_programs_per_sm": depth}
                try:
                    got = pa.paged_decode_attention(q, k_pool, v_pool, tables, pos, bs, addresses)  # compiles
                    ref = got if ref is None else ref
                    seconds = graph_seconds(lambda: pa.paged_decode_attention(q, k_pool, v_pool, tables, pos, bs,
                                                                              addresses), repeats)
                    out.append({**launch, "us": seconds * 1e6, "bytes_per_s": kv_bytes / seconds,
                                "max_abs_diff_vs_first": float((got.float() - ref.float()).abs().max())})
                except Exception as exc:  # noqa: BLE001 - a configuration that does not compile is reported
                    out.append({**launch, "error": repr(exc)[:300]})
            del k_pool, v_pool
    finally:
        pa.PIPELINE, pa.NUM_WARPS, pa.NUM_STAGES, pa.MIN_PROGRAMS_PER_SM = saved
    return out


@contextlib.contextmanager
def separate_projections(model, separate: bool):
    """With `separate`: each q/k/v and gate/up weight on its own storage inside the block (the decode path then
    runs separate GEMMs), stacked again after it; otherwise nothing changes."""
    if separate:
        for group in (group for layer in model.layers for group in layer.projection_groups()):
            for p in group:
                p.data = p.data.clone()
    try:
        yield
    finally:
        if separate:
            for layer in model.layers:
                layer.stack_projections()


def run_shape(args, shape, device, dtype, layout) -> dict:
    if args.attention_sweep:
        return {"attention_sweep": attention_sweep(shape, device, dtype)}
    torch.manual_seed(0)
    model = build_ours_random(shape, layout, device, dtype)
    model.fused_inference = device.type == "cuda"  # CPU smoke: plain torch ops (the interpreter runs only the paged kernel)
    prompts, lengths = workload(args, SHAPES[shape]["vocab_size"])
    out = {"rows": len(lengths), "mean_length": sum(lengths) / len(lengths), "max_length": max(lengths)}
    # guarded: a variant's failure is reported and the other figures kept
    for name in args.variants.split(","):
        engine = dict(VARIANTS[name])
        try:
            with (separate_projections(model, not engine.pop("stacked", True)),
                  gpu_specs.blas_library(engine.pop("blas", None))):
                out[name] = run_new(args, shape, model, prompts, lengths, layout.tp_group, f"{shape}_{name}",
                                    **engine)
        except Exception as exc:  # noqa: BLE001 - report and keep the other figures
            out[name] = {"error": repr(exc)[:2000]}
    # the ratio the new engine would reach if a row-step (one row through one decode step) cost what it costs the
    # static engine: the static engine decodes every row to the longest length, the new one each row to its own
    out["row_step_ceiling"] = len(lengths) * max(lengths) / sum(lengths)
    if not args.no_static:
        out["static"] = run_static(args, model, prompts, lengths, layout.tp_group)
    bandwidths = {"bound_spec": spec_bandwidth(device), "bound_measured_copy": copy_bandwidth(device)}
    for name in args.variants.split(","):
        if "tokens_per_s" not in out[name]:
            continue
        if "static" in out:
            out[f"ratio_{name}_over_static"] = out[name]["tokens_per_s"] / out["static"]["tokens_per_s"]
        for key, bw in bandwidths.items():
            if bw is not None:
                out[name][key] = bandwidth_bound(shape, model, out[name], bw)
        peak = peak_flops(device)
        if peak and bandwidths["bound_spec"] and not args.max_batch:
            out[name]["roofline_spec"] = roofline_bound(shape, model, out[name], lengths, args,
                                                        bandwidths["bound_spec"], peak)
    del model
    torch.cuda.empty_cache() if device.type == "cuda" else None
    if not args.no_hf:
        out["hf"] = run_hf(args, shape, device, dtype)
        for name in args.variants.split(","):
            if "tokens_per_s" in out[name]:
                out[f"ratio_{name}_over_hf"] = out[name]["tokens_per_s"] / out["hf"]["tokens_per_s"]
    return out


def run_grpo(args, shape, device, dtype) -> dict:
    """One GRPO step with a slow reward, streaming vs after generation (forced lengths as above)."""
    from verl_mega.rollout import get_actor_model
    from verl_mega.trainer import PPOTrainer, Reward, Rollout, TrainerConfig

    hf = build_hf(shape, device, dtype)
    path = tempfile.mkdtemp(prefix="rollout_bench_")
    hf.save_pretrained(path)
    del hf
    actor = get_actor_model(path, torch_dtype=dtype)
    actor.model.fused_inference = device.type == "cuda"
    prompts, lengths = workload(args, SHAPES[shape]["vocab_size"])
    cfg = TrainerConfig()
    cfg.trainer.rollout_batch_size, cfg.rollout.n_samples = len(prompts), args.n
    cfg.rollout.max_new_tokens = args.max_len
    cfg.trainer.micro_batch_size = args.micro_batch
    seq_len = args.prompt_len + args.max_len + 64
    cfg.rollout.engine = EngineConfig(max_batch=len(lengths), max_seq_len=seq_len, max_tokens=len(lengths) * seq_len,
                                      block_size=args.block_size, kv_len_bucket=args.kv_len_bucket)
    cfg.data.max_prompt_length = args.prompt_len

    def reward(response: str) -> float:
        time.sleep(args.reward_ms / 1000)
        return 0.0

    trainer = PPOTrainer(actor, reward_fn=reward, config=cfg)
    worker = ForcedLengthWorker(RolloutWorker(trainer.worker.weights, eos_token_ids=[EOS], pad_token_id=0,
                                              engine_config=cfg.rollout.engine), lengths=lengths)
    samples = [{"prompt_ids": p} for p in prompts]
    out = {}
    for mode in ("warmup", "after_generation", "streaming"):
        rollout = Rollout(worker, cfg.rollout, seed=0, tokenizer=None, pad_id=0,
                          rewards=trainer.rewards if mode != "after_generation" else None)
        trainer.pipeline = trainer.pipeline.replace("rollout", rollout).replace("reward", Reward(trainer.rewards))
        start = time.perf_counter()
        m = trainer.step(samples)
        step_s = time.perf_counter() - start
        if mode != "warmup":
            out[mode] = {"step_seconds": step_s, **{k: v for k, v in m.items() if k.startswith("time/")}}
    after, stream = out["after_generation"]["time/reward"], out["streaming"]["time/reward"]
    out["reward_seconds_serial"] = len(lengths) * args.reward_ms / 1000
    out["reward_workers"] = cfg.rollout.reward_workers
    out["hidden_fraction"] = 1 - stream / max(after, 1e-9)
    trainer.rewards.close()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shape on CPU, 4 prompts x 2, lengths [2, 12]")
    p.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-7b")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"new-engine variants, of {sorted(VARIANTS)}")
    p.add_argument("--max-batch", type=int, default=0, help="new engine rows in flight (0 = all rows)")
    p.add_argument("--max-tokens", type=int, default=0, help="new engine KV budget in tokens (0 = rows x longest)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-len-bucket", type=int, default=128)
    p.add_argument("--hf-batch", type=int, default=64)
    p.add_argument("--hf-new-tokens", type=int, default=256)
    p.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    p.add_argument("--hf", dest="no_hf", action="store_false", help="time transformers' generate (the default)")
    p.add_argument("--reward-ms", type=float, default=50.0)
    p.add_argument("--grpo-shape", default="qwen2.5-0.5b", help="'' skips the GRPO step")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--profile", action="store_true", help="one more new-engine call under torch.profiler: device "
                   "busy fraction and top ops (rollout_profile_<shape>_<variant>.txt in --out-dir)")
    p.add_argument("--no-static", action="store_true", help="skip the static engine (and the ratios to it)")
    p.add_argument("--step-curve", default="", help="rows, e.g. 512,256,64,16: ms per decode step of each "
                   "new-engine variant at that many rows, each attending --curve-context tokens, against its bounds")
    p.add_argument("--curve-context", type=int, default=640)
    p.add_argument("--attention-sweep", action="store_true", help="only the paged attention kernel per launch "
                   "configuration at each shape's heads (ATTENTION_CONFIGS; CUDA)")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "outputs"))
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; known: {sorted(VARIANTS)}")
    if args.smoke:
        args.shapes, args.grpo_shape = "tiny", "tiny"
        args.prompts, args.n, args.prompt_len, args.min_len, args.max_len = 4, 2, 8, 2, 12
        args.hf_batch, args.hf_new_tokens, args.kv_len_bucket, args.block_size = 4, 8, 16, 4
        args.reward_ms, args.micro_batch = 20.0, 8
    from verl_mega.parallel.layout import Layout

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layout = Layout.create(1, 1)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "args": vars(args)}
    os.makedirs(args.out_dir, exist_ok=True)

    def record(key, value):  # results are written after every part, so a time-out keeps what was measured
        result[key] = value
        print(json.dumps({key: value}, indent=1), flush=True)
        with open(os.path.join(args.out_dir, "rollout_service.json"), "w") as f:
            json.dump(result, f, indent=1)

    record("greedy_parity_tiny_fp32", parity_check(device))
    for shape in [s for s in args.shapes.split(",") if s]:
        record(shape, run_shape(args, shape, device, dtype, layout))
        if args.attention_sweep:
            with open(os.path.join(args.out_dir, "attention_sweep.md"), "a") as f:
                f.write(attention_sweep_table(shape, result["device"], result[shape]["attention_sweep"]))
    if args.grpo_shape:
        record("grpo_step", run_grpo(args, args.grpo_shape, device, dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
