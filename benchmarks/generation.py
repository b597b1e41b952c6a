"""Generation throughput of the static engine (`benchmarks/static_engine.py`, the baseline kept for
benchmarks/rollout_service.py) vs transformers' `generate`, CUDA graphs on/off.

    python benchmarks/generation.py                 # GPU: Qwen2.5-0.5B and 7B shapes (random bf16 weights)
    python benchmarks/generation.py --quick         # CPU smoke run at tiny shapes (no CUDA graphs)

Per case: batch B, prompt length P (random token ids, no padding), exactly N new tokens (EOS
ignored; transformers with min_new_tokens=N), sampling at temperature 1 (no top-k / top-p).
Throughput = B*N new tokens / wall time of one full generate call (prefill included; best of
--repeats), after a warm-up call with the same shapes (which also captures the CUDA graphs /
compiles). Variants: "graphs" (CUDA-graph decode, the default on GPU), "eager"; optional (time
budget permitting, 0.5B batch 64): "graphs-unfused" (the decoder's plain torch ops instead of
fused_ops: what the fused kernels buy) and "graphs+compile" (torch.compile'd decode step in the graphs).

Same weights: the 0.5B model is built with transformers (random init on the GPU), saved, and
loaded by `get_actor_model` from that directory. At the 7B shape (15 GB in bf16) the save/load
round trip is skipped: transformers' model is timed and freed, then our model gets its own random
weights drawn on the GPU (throughput does not depend on the values); --no-hf-7b skips the baseline.

Checks and diagnostics (in the JSON's "meta" and the .md):
- first, a correctness gate: tiny fp32 model, prompts of different lengths left-padded: our greedy
  tokens (graphs and eager) == transformers' greedy tokens, exactly (printed as PASS / FAIL);
- 0.5B bf16: greedy tokens graphs vs eager and vs transformers, as agreement fractions;
- one decode step, same state, eager vs CUDA-graph replay (fused and unfused ops): max |logit
  difference|, argmax flips, and the top-1/top-2 logit gaps (random std-0.02 weights give nearly
  flat logits, so a rounding-level difference can flip an argmax);
- torch.profiler tables of the eager decode step, 0.5B and 7B at the first batch size (kernels per
  step with fused and unfused ops, the top kernels);
- decode attention alone, eager vs captured in a CUDA graph, in the pre-fix form (K/V expanded to
  every query head, bool mask) and the decoder's folded form, with the SDPA backend each gets and
  the time per call of each backend.
A --time-budget (seconds) skips the remaining optional steps once spent (listed under "skipped").

Writes $OUT/generation.json, $OUT/generation.md and $OUT/generation_profile{,_7b}.txt (or --out-dir).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback

# this directory holds kernels.py, which would shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1000, tie_word_embeddings=True),
}
VARIANTS = {  # engine keyword arguments; "fused" = the model's fused_inference flag
    "graphs": dict(use_cuda_graph=True),
    "eager": dict(use_cuda_graph=False),
    "graphs-unfused": dict(use_cuda_graph=True, fused=False),
    "graphs+compile": dict(use_cuda_graph=True, compile_decode=True, kv_len_bucket=512),  # one kv bucket: one compile
}
NEVER_EOS = 10_000


class Run:
    """Shared state of one benchmark run: layout, device, dtype, time budget, errors, skipped steps."""

    def __init__(self, args, layout, device, dtype):
        self.args, self.layout, self.device, self.dtype = args, layout, device, dtype
        self.t0 = time.perf_counter()
        self.errors: list[str] = []
        self.skipped: list[str] = []
        self.meta: dict = {}
        self.rows: list[dict] = []

    def in_budget(self, what: str, need_s: float = 0.0) -> bool:
        """True when `need_s` more seconds still fit in --time-budget; else records `what` as skipped."""
        if time.perf_counter() - self.t0 + need_s < self.args.time_budget:
            return True
        self.skipped.append(what)
        print(f"skipped (time budget): {what}", flush=True)
        return False

    def guarded(self, what: str, fn, *args, **kw):
        """fn(...), or None with the error recorded (one failing case does not lose the others)."""
        try:
            return fn(*args, **kw)
        except Exception as exc:  # noqa: BLE001 - reported in the output files
            traceback.print_exc()
            self.errors.append(f"{what}: {exc!r}")
            return None


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_call(fn, repeats: int = 1) -> float:
    """Best wall time (s) of `repeats` calls of fn."""
    best = float("inf")
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


def graph_seconds(fn, calls: int, replays: int = 5) -> float:
    """Device seconds per call of fn: `calls` calls captured in one CUDA graph (as decode runs them, without the
    host's launch cost), the median of `replays` replays."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / calls)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------------- models
def hf_config(shape: str):
    from transformers import Qwen2Config

    return Qwen2Config(**SHAPES[shape], max_position_embeddings=32768, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                       bos_token_id=0, eos_token_id=1, pad_token_id=0)


def build_hf(shape: str, device: torch.device, dtype: torch.dtype):
    """transformers' Qwen2ForCausalLM with random weights drawn on `device`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config(shape), dtype=dtype)
    return model.eval()


def build_ours_random(shape: str, layout, device: torch.device, dtype: torch.dtype):
    """Our one-stage model with N(0, 0.02) weights drawn directly on `device` (no HF round trip)."""
    from verl_mega.models.config import ModelConfig
    from verl_mega.models.parallelize import build_stage

    model = build_stage(ModelConfig.from_hf(hf_config(shape).to_dict()), layout, params_dtype=dtype,
                        device=device, init_seed=None)
    fill_random_(model, torch.Generator(device=device).manual_seed(0))
    return model.eval()


@torch.no_grad()
def fill_random_(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Benchmark weights in place, drawn where they live: norm weights 1, every other tensor N(0, 0.02)."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)


def make_engine(run: Run, model, rows: int, seq: int, fused: bool = True, **kw):
    """Engine over `model`; `fused` sets the model's fused_inference flag (fused_ops kernels)."""
    from benchmarks.static_engine import StaticGenerationEngine

    model.fused_inference = fused
    return StaticGenerationEngine(model, run.layout.tp_group, max_batch=rows, max_seq_len=seq, eos_token_ids=[1],
                            pad_token_id=0, **kw)


# ---------------------------------------------------------------------------------------------- timing
def bench_hf(model, prompts: torch.Tensor, new_tokens: int) -> float:
    """Seconds for transformers' sampled generate of exactly new_tokens tokens."""
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=1)
    attn = torch.ones_like(prompts)
    with torch.no_grad():
        model.generate(prompts, attention_mask=attn, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        return time_call(lambda: model.generate(prompts, attention_mask=attn, max_new_tokens=new_tokens,
                                                min_new_tokens=new_tokens, **kw))


def bench_ours(run: Run, model, prompts: list[list[int]], new_tokens: int, variant: str) -> dict:
    """Seconds for our sampled generate (EOS ignored); a warm-up call first (graphs, compilation)."""
    engine = make_engine(run, model, len(prompts), len(prompts[0]) + new_tokens, **VARIANTS[variant])
    kw = dict(max_new_tokens=new_tokens, temperature=1.0, ignore_eos=True)
    t_warm = time_call(lambda: engine.generate(prompts, seed=1, **kw))
    seconds = time_call(lambda: engine.generate(prompts, seed=2, **kw), run.args.repeats)
    prefill = time_call(lambda: engine.generate(prompts, max_new_tokens=1, temperature=1.0, ignore_eos=True))
    out = {"seconds": seconds, "first_call_seconds": t_warm, "prefill_seconds": prefill,
           "decode_ms_per_step": 1000 * (seconds - prefill) / max(1, new_tokens - 1),
           "graphs_captured": len(engine._graphs), "graphs_in_use": engine.use_cuda_graph,
           "kv_cache_gib": engine.cache.memory_bytes() / 2**30}
    engine.release()
    model.fused_inference = True
    return out


def bench_variants(run: Run, shape: str, model, prompt_sets: dict, hf_times: dict, variants: list[str]) -> None:
    new_tokens = run.args.new_tokens
    for b, prompts in prompt_sets.items():
        for variant in variants:
            if not run.in_budget(f"{shape} b={b} {variant}"):
                continue
            r = run.guarded(f"{shape} b={b} {variant}", bench_ours, run, model, prompts.tolist(), new_tokens, variant)
            if r is None:
                continue
            row = {"shape": shape, "batch": b, "prompt_len": prompts.shape[1], "new_tokens": new_tokens,
                   "variant": variant, "tokens_per_s": b * new_tokens / r["seconds"], **r}
            if hf_times.get(b):
                row.update(hf_seconds=hf_times[b], hf_tokens_per_s=b * new_tokens / hf_times[b],
                           speedup_vs_hf=hf_times[b] / r["seconds"])
            run.rows.append(row)
            print(f"[{shape}] ours b={b} {variant}: {row['tokens_per_s']:.0f} tok/s (decode "
                  f"{r['decode_ms_per_step']:.2f} ms/step, prefill {r['prefill_seconds'] * 1000:.0f} ms, "
                  f"{r['graphs_captured']} graphs)"
                  + (f", {row['speedup_vs_hf']:.1f}x transformers" if "speedup_vs_hf" in row else ""), flush=True)


# ---------------------------------------------------------------------------------------------- checks
def _agreement(a: torch.Tensor, b: torch.Tensor, lp_a: torch.Tensor, lp_b: torch.Tensor) -> dict:
    """Token agreement of two [N, R] greedy runs and the largest log-prob gap before rows diverge."""
    diverge = [int((x != y).nonzero()[0]) if (x != y).any() else len(x) for x, y in zip(a, b)]
    gap = max((float((lp_a[i, :d] - lp_b[i, :d]).abs().max()) for i, d in enumerate(diverge) if d > 0), default=0.0)
    return {"rows_identical": sum(d == a.shape[1] for d in diverge) / len(diverge),
            "mean_matching_prefix": sum(diverge) / len(diverge), "max_logprob_diff_before_divergence": gap}


def greedy_checks(run: Run, model, hf_model, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy tokens: graphs vs eager, and ours vs transformers (bf16 random weights: informational)."""
    outs = {}
    for variant in (["graphs", "eager"] if torch.cuda.is_available() else ["eager"]):
        engine = make_engine(run, model, len(prompts), len(prompts[0]) + new_tokens, **VARIANTS[variant])
        o = engine.generate(prompts, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        outs[variant] = (o.response_ids, o.response_logprobs)
        engine.release()
    res = {"tokens_compared": new_tokens}
    if "graphs" in outs:
        (tok_g, lp_g), (tok_e, lp_e) = outs["graphs"], outs["eager"]
        res["graphs_vs_eager"] = _agreement(tok_g, tok_e, lp_g, lp_e)
    if hf_model is not None:
        ids = torch.tensor(prompts, device=run.device)
        with torch.no_grad():
            o = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=1, top_k=None, top_p=None,
                                  temperature=None, output_logits=True, return_dict_in_generate=True)
        ref = o.sequences[:, ids.shape[1]:].cpu()
        ref_lp = torch.stack([torch.log_softmax(s.float(), -1).gather(-1, ref[:, i:i + 1].to(s.device))[:, 0]
                              for i, s in enumerate(o.logits)], dim=1).cpu()  # raw logits (no min_new_tokens mask)
        res["eager_vs_transformers"] = _agreement(outs["eager"][0], ref, outs["eager"][1], ref_lp)
    return res


def tiny_parity_check(run: Run) -> dict:
    """fp32 tiny model (O(1) random weights), prompts of different lengths left-padded: our greedy
    tokens, with and without CUDA graphs, must equal transformers' greedy tokens exactly."""
    from transformers import AutoModelForCausalLM

    from verl_mega.rollout.actor import get_actor_model
    from verl_mega.testing.tiny_hf import make_tiny_hf_model

    path = make_tiny_hf_model(tempfile.mkdtemp(prefix="bench_tiny_"), arch="qwen2", vocab_size=130, seed=3,
                              hidden_size=64, num_layers=3)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(6, 130, (n,), generator=gen).tolist() for n in (3, 17, 9, 30, 1, 12)]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(run.device).eval()
    p_len = max(map(len, prompts))
    ids = torch.tensor([[0] * (p_len - len(p)) + p for p in prompts], device=run.device)
    mask = torch.tensor([[0] * (p_len - len(p)) + [1] * len(p) for p in prompts], device=run.device)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=40, pad_token_id=0,
                          eos_token_id=NEVER_EOS, top_k=None, top_p=None, temperature=None)[:, p_len:].cpu()
    model = get_actor_model(path, torch_dtype=torch.float32, layout=run.layout, device=run.device).model.eval()
    from verl_mega.models import fused_ops

    res = {"tiny_fp32_fused_ops_available": fused_ops.available(next(model.parameters()))}
    for variant in (["graphs", "eager"] if torch.cuda.is_available() else ["eager"]):
        engine = make_engine(run, model, 8, 128, **VARIANTS[variant])
        ours = engine.generate(prompts, max_new_tokens=40, temperature=0.0).response_ids
        res[f"tiny_fp32_{variant}_greedy_equals_transformers"] = bool(torch.equal(ours, ref))
        if variant == "graphs":
            res["tiny_fp32_graphs_captured"] = len(engine._graphs)
    return res


# ---------------------------------------------------------------------------------------------- diagnostics
def graph_vs_eager_step(run: Run, model, prompts: list[list[int]], fused: bool) -> dict:
    """One decode step from the same state (prefill + the greedy first token): eager forward twice
    (determinism) and the CUDA-graph replay; logit differences, argmax flips and top-2 gaps."""
    from verl_mega.rollout.engine import batch_bucket

    b, p_len = len(prompts), len(prompts[0])
    engine = make_engine(run, model, b, p_len + 8, fused=fused, use_cuda_graph=True)
    bb = batch_bucket(b, engine.max_batch)
    with torch.no_grad():
        first = engine._prefill(prompts, p_len, bb)[:b].argmax(-1)
        engine._tokens[:b, 0] = first
        engine._write_pos.fill_(p_len)
        engine._positions[:b] += 1
        kv_len = engine._kv_len(p_len + 1)
        steps = {}
        for name in ("eager", "eager_again"):
            engine._decode_forward(bb, kv_len)  # idempotent: same cache slot, same inputs
            steps[name] = engine._logits[:b].clone()
        steps["graph"] = engine._decode(bb, kv_len)[:b].clone()
    model.fused_inference = True
    eager, graph = steps["eager"], steps["graph"]
    top2 = eager.topk(2, dim=-1).values
    gap = top2[:, 0] - top2[:, 1]  # [b]
    flips = eager.argmax(-1) != graph.argmax(-1)
    res = {"fused": fused, "graph_captured": bool(engine._graphs),
           "max_abs_diff_eager_vs_eager": float((steps["eager_again"] - eager).abs().max()),
           "max_abs_diff_graph_vs_eager": float((graph - eager).abs().max()),
           "argmax_flips": int(flips.sum()), "rows": b, "logit_std": float(eager.std()),
           "top2_gap_min": float(gap.min()), "top2_gap_median": float(gap.median()),
           "top2_gap_at_flips": [round(float(g), 6) for g in gap[flips]]}
    engine.release()
    print(f"graph vs eager step (fused={fused}): {res}", flush=True)
    return res


def attention_capture_check(run: Run, b: int = 64, kv_len: int = 192, reps: int = 50) -> dict:
    """Decode attention at the 0.5B shape (14 query / 2 KV heads, head_dim 64), eager vs inside a CUDA
    graph, for the pre-fix form (K/V expanded to every query head, bool mask) and the decoder's
    folded form (float bias); the SDPA backend each gets, and us per call per forced backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from verl_mega.models.layers import attend
    from verl_mega.models.masks import attention_bias

    hq, hkv, d, max_seq = 14, 2, 64, 384
    rep, dev, dt = hq // hkv, run.device, run.dtype
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(b, 1, hq, d, device=dev, dtype=dt, generator=g).transpose(1, 2)  # [batch, heads, 1, head_dim]
    k_cache, v_cache = (torch.randn(b, hkv, max_seq, d, device=dev, dtype=dt, generator=g) for _ in range(2))
    slots = torch.zeros(b, max_seq, dtype=torch.bool, device=dev)
    slots[:, :kv_len - 20] = True
    slots[: b // 2, :7] = False  # left padding on half the rows
    k, v = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
    bool_mask = slots[:, None, None, :kv_len]
    bool_mask = bool_mask | ~bool_mask.any(-1, keepdim=True)  # as build_attention_mask

    def legacy():
        ke, ve = (t[:, :, None].expand(b, hkv, rep, kv_len, d).reshape(b, hq, kv_len, d) for t in (k, v))
        return F.scaled_dot_product_attention(q, ke, ve, attn_mask=bool_mask).transpose(1, 2).reshape(b, 1, hq * d)

    def folded():
        return attend(q, k, v, attention_bias(bool_mask, dt))

    def backend_name(fn_args) -> str:
        try:
            return SDPBackend(int(torch._fused_sdp_choice(*fn_args))).name
        except Exception as exc:  # noqa: BLE001 - private API, informational
            return f"unknown ({exc!r})"

    ke = k[:, :, None].expand(b, hkv, rep, kv_len, d).reshape(b, hq, kv_len, d)
    bias = attention_bias(bool_mask, dt)
    res = {"shape": f"b={b} kv_len={kv_len} heads {hq}/{hkv} head_dim {d}",
           "backend_legacy": backend_name((q, ke, ke, bool_mask)),
           "backend_folded": backend_name((q.reshape(b, hkv, rep, d), k, v, bias.expand(b, 1, rep, kv_len)))}
    with torch.no_grad():
        for name, fn in (("legacy", legacy), ("folded", folded)):
            eager = fn().clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn()
            graph.replay()
            _sync()
            res[f"{name}_graph_vs_eager_max_abs_diff"] = float((out.float() - eager.float()).abs().max())
            res[f"{name}_eager_repeat_max_abs_diff"] = float((fn().float() - eager.float()).abs().max())
            res[f"{name}_us"] = time_call(lambda: [fn() for _ in range(reps)]) / reps * 1e6
        res["legacy_vs_folded_max_abs_diff"] = float((legacy().float() - folded().float()).abs().max())
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
            try:
                with sdpa_kernel([backend]):
                    folded()
                    res[f"folded_us_{backend.name}"] = time_call(lambda: [folded() for _ in range(reps)]) / reps * 1e6
            except Exception as exc:  # noqa: BLE001 - a backend that refuses this input
                res[f"folded_us_{backend.name}"] = f"unavailable: {str(exc)[:80]}"
    print(f"attention capture check: {res}", flush=True)
    return res


def profile_eager_decode(run: Run, model, prompts: list[list[int]], out_path: str) -> dict:
    """CUDA kernels per eager decode step (fused and unfused ops) from torch.profiler: kernels of a
    9-token generate minus those of a 1-token one (prefill), over 8; the fused top-kernel table to out_path."""
    from torch.profiler import ProfilerActivity, profile

    res, tables = {}, []
    for fused in (True, False):
        engine = make_engine(run, model, len(prompts), len(prompts[0]) + 16, fused=fused, use_cuda_graph=False)
        counts = {}
        for n in (9, 1):
            kw = dict(max_new_tokens=n, temperature=1.0, ignore_eos=True)
            engine.generate(prompts, **kw)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                engine.generate(prompts, **kw)
                _sync()
            averages = prof.key_averages()
            counts[n] = sum(e.count for e in averages if str(getattr(e, "device_type", "")).endswith("CUDA"))
            if n == 9 and fused:
                key = "self_device_time_total"
                key = key if hasattr(averages[0], key) else "self_cuda_time_total"
                tables.append(averages.table(sort_by=key, row_limit=30))
        engine.release()
        res[f"kernels_per_decode_step_{'fused' if fused else 'unfused'}"] = (counts[9] - counts[1]) / 8
    model.fused_inference = True
    with open(out_path, "w") as f:
        f.write(f"eager generate, batch {len(prompts)}, 1 prefill + 8 decode steps (fused ops); {res}\n\n{tables[0]}\n")
    print(f"profile: {res}", flush=True)
    return res


# ---------------------------------------------------------------------------------------------- driver
def prompt_sets_for(run: Run, shape: str, batches: list[int]) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {b: torch.randint(2, SHAPES[shape]["vocab_size"], (b, run.args.prompt_len), generator=gen) for b in batches}


def run_shape(run: Run, shape: str, batches: list[int], with_hf: bool, same_weights: bool) -> str | None:
    """transformers baseline, checks (0.5B), graphs and eager for one shape; returns the HF directory
    our model was loaded from (0.5B) or None."""
    from verl_mega.rollout.actor import get_actor_model

    prompt_sets = prompt_sets_for(run, shape, batches)
    hf_times, hf_model, model, path = {}, None, None, None
    if with_hf and run.in_budget(f"{shape} transformers"):
        hf_model = build_hf(shape, run.device, run.dtype)
        for b, prompts in prompt_sets.items():
            hf_times[b] = run.guarded(f"{shape} transformers b={b}", bench_hf, hf_model, prompts.to(run.device),
                                      run.args.new_tokens)
            if hf_times[b]:
                print(f"[{shape}] transformers b={b}: {b * run.args.new_tokens / hf_times[b]:.0f} tok/s", flush=True)
        if same_weights:
            path = tempfile.mkdtemp(prefix=f"bench_{shape}_")
            hf_model.save_pretrained(path)
            model = get_actor_model(path, torch_dtype=run.dtype, layout=run.layout, device=run.device).model.eval()
        else:
            hf_model = None
            _free()
    if model is None:
        model = build_ours_random(shape, run.layout, run.device, run.dtype)
    run.meta.setdefault("hf_times", {})[shape] = hf_times
    if shape != "qwen2.5-7b":
        first = prompt_sets[batches[0]]
        run.meta[f"{shape}_greedy"] = run.guarded(f"{shape} greedy checks", greedy_checks, run, model, hf_model,
                                                  first[:16].tolist(), 32)
        if torch.cuda.is_available():
            run.meta[f"{shape}_graph_vs_eager_step"] = [
                run.guarded(f"{shape} graph vs eager step", graph_vs_eager_step, run, model, first.tolist(), fused)
                for fused in (True, False)]
    hf_model = None
    _free()
    variants = ["graphs", "eager"] if torch.cuda.is_available() else ["eager"]
    bench_variants(run, shape, model, prompt_sets, hf_times, variants)
    if shape == "qwen2.5-7b" and torch.cuda.is_available() and run.in_budget("7b profile", 30):
        run.meta["qwen2.5-7b_profile"] = run.guarded("7b profile", profile_eager_decode, run, model,
                                                     prompt_sets[batches[0]].tolist(),
                                                     os.path.join(run.args.out_dir, "generation_profile_7b.txt"))
    del model
    _free()
    return path


def run_optional(run: Run, path: str) -> None:
    """0.5B batch-64 extras, while the time budget lasts: unfused ops, profile, torch.compile."""
    from verl_mega.rollout.actor import get_actor_model

    shape, b = "qwen2.5-0.5b", run.args.batches.split(",")[0]
    model = get_actor_model(path, torch_dtype=run.dtype, layout=run.layout, device=run.device).model.eval()
    prompt_sets = prompt_sets_for(run, shape, [int(x) for x in run.args.batches.split(",") if x])
    prompt_sets = {int(b): prompt_sets[int(b)]}
    hf_times = run.meta["hf_times"].get(shape, {})
    if run.in_budget("0.5b graphs-unfused", 20):
        bench_variants(run, shape, model, prompt_sets, hf_times, ["graphs-unfused"])
    if run.in_budget("profile", 20):
        run.meta.update(run.guarded("profile", profile_eager_decode, run, model, prompt_sets[int(b)].tolist(),
                                    os.path.join(run.args.out_dir, "generation_profile.txt")) or {})
    if run.in_budget("attention capture check", 10):
        run.meta["attention_capture_check"] = run.guarded("attention capture check", attention_capture_check, run)
    write_report(run)  # before the compile, which may run past the command's time limit
    if not run.args.no_compile and run.in_budget("0.5b graphs+compile", run.args.compile_budget):
        bench_variants(run, shape, model, prompt_sets, hf_times, ["graphs+compile"])


def write_report(run: Run) -> None:
    out_dir = run.args.out_dir
    os.makedirs(out_dir, exist_ok=True)
    meta = {**run.meta, "errors": run.errors, "skipped": run.skipped, "seconds": time.perf_counter() - run.t0}
    with open(os.path.join(out_dir, "generation.json"), "w") as f:
        json.dump({"meta": meta, "results": run.rows}, f, indent=2, default=str)
    lines = [f"# Generation throughput ({meta['device']}, torch {meta['torch']})", "",
             f"prompt {meta['prompt_len']} tokens, {meta['new_tokens']} new tokens forced, sampling T=1, {meta['dtype']}",
             "", "| shape | batch | variant | tokens/s | decode ms/step | prefill ms | transformers tokens/s | speed-up |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in run.rows:
        hf = f"{r['hf_tokens_per_s']:.0f}" if "hf_tokens_per_s" in r else "skipped"
        sp = f"{r['speedup_vs_hf']:.1f}x" if "speedup_vs_hf" in r else "-"
        lines.append(f"| {r['shape']} | {r['batch']} | {r['variant']} | {r['tokens_per_s']:.0f} | "
                     f"{r['decode_ms_per_step']:.2f} | {r['prefill_seconds'] * 1000:.0f} | {hf} | {sp} |")
    shown = [k for k in meta if k.startswith(("tiny_", "kernels_per", "attention"))
             or k.endswith(("_greedy", "_step", "_profile"))]
    for key in sorted(shown):
        lines += ["", f"{key}: {json.dumps(meta[key], default=str)}"]
    for key in ("errors", "skipped"):
        if meta[key]:
            lines += ["", f"{key}:"] + [f"- {e}" for e in meta[key]]
    with open(os.path.join(out_dir, "generation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes on CPU (smoke test)")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "outputs"))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batches", default="64,256", help="batch sizes of the 0.5B shape (the first one for the extras)")
    p.add_argument("--batches-7b", default="64,256", help="batch sizes of the 7B shape ('' = skip 7B)")
    p.add_argument("--no-hf-7b", action="store_true", help="skip the transformers baseline at the 7B shape")
    p.add_argument("--no-compile", action="store_true", help="skip the graphs+compile variant")
    p.add_argument("--compile-budget", type=float, default=150.0, help="seconds graphs+compile needs to be tried")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--time-budget", type=float, default=400.0, help="seconds after which optional steps are skipped")
    args = p.parse_args(argv)

    from verl_mega.parallel.dist import init_distributed
    from verl_mega.parallel.layout import Layout

    init_distributed(backend="gloo")  # tp = 1: no collectives run; a world-1 gloo group avoids NCCL set-up
    cuda = torch.cuda.is_available()
    run = Run(args, Layout.create(tp=1, pp=1), torch.device("cuda" if cuda else "cpu"),
              torch.bfloat16 if cuda else torch.float32)
    for name in ("recompile_limit", "cache_size_limit"):  # compile: one graph per (batch, kv_len) bucket
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    if args.quick:
        args.prompt_len, args.new_tokens = min(args.prompt_len, 16), min(args.new_tokens, 8)
    run.meta.update(device=torch.cuda.get_device_name() if cuda else "cpu", torch=torch.__version__,
                    dtype=str(run.dtype).removeprefix("torch."), prompt_len=args.prompt_len, new_tokens=args.new_tokens)
    parity = run.guarded("tiny parity", tiny_parity_check, run) or {}
    run.meta.update(parity)
    ok = bool(parity) and all(v for k, v in parity.items() if k.endswith("equals_transformers"))
    print(f"tiny fp32 greedy parity vs transformers: {'PASS' if ok else 'FAIL'} {parity}", flush=True)
    if args.quick:
        run_shape(run, "tiny", [4, 8], True, True)
        write_report(run)
        return 0
    path = run_shape(run, "qwen2.5-0.5b", [int(b) for b in args.batches.split(",") if b], True, True)
    write_report(run)  # partial results survive a later failure
    if args.batches_7b:
        run_shape(run, "qwen2.5-7b", [int(b) for b in args.batches_7b.split(",")], not args.no_hf_7b, False)
        write_report(run)
    if path is not None and cuda:
        run.guarded("optional 0.5B extras", run_optional, run, path)
    write_report(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
