"""Generation throughput: verl_mega's GenerationEngine vs transformers' `generate`, CUDA graphs on/off.

    python benchmarks/generation.py                 # GPU: Qwen2.5-0.5B and 7B shapes (random bf16 weights)
    python benchmarks/generation.py --quick         # CPU smoke run at tiny shapes (no CUDA graphs)

Per case: batch B, prompt length P (random token ids, no padding), exactly N new tokens (EOS
ignored; transformers with min_new_tokens=N), sampling at temperature 1 (no top-k / top-p).
Throughput = B*N new tokens / wall time of one full generate call (prefill included), after a
warm-up call with the same shapes (which also captures the CUDA graphs / compiles).
Variants: "graphs" (CUDA-graph decode, the default on GPU), "eager", and "graphs+compile"
(torch.compile'd decode step inside the graphs; 0.5B only unless --compile-7b).

Same weights: the 0.5B model is built with transformers (random init on the GPU), saved, and
loaded by `get_actor_model` from that directory. At the 7B shape (15 GB in bf16) the save/load
round trip is skipped: transformers' model is timed and freed, then our model gets its own random
weights drawn on the GPU (throughput does not depend on the values); --no-hf-7b skips the baseline.

Checks and diagnostics (in the JSON's "meta"):
- tiny fp32 model, prompts of different lengths: greedy tokens of ours (graphs and eager) ==
  transformers' greedy tokens, exactly;
- 0.5B bf16: greedy tokens graphs vs eager and vs transformers, as agreement fractions, with the
  largest log-prob difference seen before the first disagreement (random std-0.02 weights give
  nearly flat logits, so bf16 rounding differences can flip an argmax);
- attention micro-benchmark: the decoder's GQA path (expand K/V to all query heads, then SDPA) vs
  folding the query heads of a KV group into the query-length axis (no K/V copies);
- a torch.profiler table of the eager decode step (kernel count and the top kernels).
A --time-budget (seconds) skips the remaining optional steps once spent (listed under "skipped").

Writes $OUT/generation.json, $OUT/generation.md and $OUT/generation_profile.txt (or --out-dir).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1000, tie_word_embeddings=True),
}
VARIANTS = {
    "graphs": dict(use_cuda_graph=True),
    "eager": dict(use_cuda_graph=False),
    "graphs+compile": dict(use_cuda_graph=True, compile_decode=True, kv_len_bucket=128),
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

    def in_budget(self, what: str) -> bool:
        if time.perf_counter() - self.t0 < self.args.time_budget:
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
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def make_engine(run: Run, model, rows: int, seq: int, **kw):
    from verl_mega.rollout.engine import GenerationEngine

    return GenerationEngine(model, run.layout.tp_group, max_batch=rows, max_seq_len=seq, eos_token_ids=[1],
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

    from verl_mega.models.actor import get_actor_model
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
    res = {}
    for variant in (["graphs", "eager"] if torch.cuda.is_available() else ["eager"]):
        engine = make_engine(run, model, 8, 128, **VARIANTS[variant])
        ours = engine.generate(prompts, max_new_tokens=40, temperature=0.0).response_ids
        res[f"tiny_fp32_{variant}_greedy_equals_transformers"] = bool(torch.equal(ours, ref))
        if variant == "graphs":
            res["tiny_fp32_graphs_captured"] = len(engine._graphs)
    return res


# ---------------------------------------------------------------------------------------------- diagnostics
def attention_microbench(run: Run, cases=(("qwen2.5-0.5b", 64, 320), ("qwen2.5-7b", 256, 320))) -> dict:
    """ms per decode attention call (one layer): the decoder's expand-K/V GQA path vs query folding."""
    res = {}
    for shape, b, kv_len in cases:
        s = SHAPES[shape]
        h, hkv = s["num_attention_heads"], s["num_key_value_heads"]
        d, rep = s["hidden_size"] // h, h // hkv
        g = torch.Generator(device=run.device).manual_seed(0)
        q = torch.randn(b, h, 1, d, device=run.device, dtype=run.dtype, generator=g)
        k = torch.randn(b, hkv, kv_len, d, device=run.device, dtype=run.dtype, generator=g)
        v = torch.randn(b, hkv, kv_len, d, device=run.device, dtype=run.dtype, generator=g)
        mask = torch.ones(b, 1, 1, kv_len, dtype=torch.bool, device=run.device)
        mask[:, :, :, 200:] = False

        def expand():
            k2 = k[:, :, None].expand(b, hkv, rep, kv_len, d).reshape(b, h, kv_len, d)
            v2 = v[:, :, None].expand(b, hkv, rep, kv_len, d).reshape(b, h, kv_len, d)
            return F.scaled_dot_product_attention(q, k2, v2, attn_mask=mask)

        def fold():  # query heads of one KV group share its keys: fold them into the query axis
            qf = q.reshape(b, hkv, rep, d)  # [batch, kv_heads, rep * seq, head_dim]
            mf = mask.expand(b, 1, rep, kv_len)
            return F.scaled_dot_product_attention(qf, k, v, attn_mask=mf).reshape(b, h, 1, d)

        with torch.no_grad():
            diff = float((expand().float() - fold().float()).abs().max())
            n = 20
            t_expand = time_call(lambda: [expand() for _ in range(n)]) / n * 1000
            t_fold = time_call(lambda: [fold() for _ in range(n)]) / n * 1000
        res[f"{shape}_b{b}_L{kv_len}"] = {"expand_ms": t_expand, "fold_ms": t_fold, "max_abs_diff": diff}
        print(f"attention {shape} b={b} L={kv_len}: expand {t_expand:.3f} ms, fold {t_fold:.3f} ms, diff {diff:.1e}",
              flush=True)
    return res


def profile_eager_decode(run: Run, model, prompts: list[list[int]], out_path: str) -> dict:
    """torch.profiler over an eager generate of 9 tokens (1 prefill + 8 decode steps)."""
    from torch.profiler import ProfilerActivity, profile

    engine = make_engine(run, model, len(prompts), len(prompts[0]) + 16, use_cuda_graph=False)
    kw = dict(max_new_tokens=9, temperature=1.0, ignore_eos=True)
    engine.generate(prompts, **kw)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.generate(prompts, **kw)
        _sync()
    engine.release()
    averages = prof.key_averages()
    kernels = sum(e.count for e in averages if str(getattr(e, "device_type", "")).endswith("CUDA"))
    table = averages.table(sort_by="self_device_time_total" if hasattr(averages[0], "self_device_time_total")
                           else "self_cuda_time_total", row_limit=35)
    with open(out_path, "w") as f:
        f.write(f"eager generate, batch {len(prompts)}, 1 prefill + 8 decode steps; CUDA kernels: {kernels}\n\n{table}\n")
    return {"profile_cuda_kernels_9_steps": kernels}


# ---------------------------------------------------------------------------------------------- driver
def run_shape(run: Run, shape: str, batches: list[int], with_hf: bool, same_weights: bool,
              variants: list[str]) -> str | None:
    """All cases of one shape; returns the HF directory our model was loaded from (0.5B) or None."""
    from verl_mega.models.actor import get_actor_model

    gen = torch.Generator().manual_seed(0)
    prompt_sets = {b: torch.randint(2, SHAPES[shape]["vocab_size"], (b, run.args.prompt_len), generator=gen)
                   for b in batches}
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
    if shape != "qwen2.5-7b":
        run.meta[f"{shape}_greedy"] = run.guarded(f"{shape} greedy checks", greedy_checks, run, model, hf_model,
                                                  prompt_sets[batches[0]][:16].tolist(), 32)
    hf_model = None
    _free()
    bench_variants(run, shape, model, prompt_sets, hf_times, variants)
    if shape == "qwen2.5-0.5b" and torch.cuda.is_available() and run.in_budget("profile"):
        run.meta.update(run.guarded("profile", profile_eager_decode, run, model, prompt_sets[batches[0]].tolist(),
                                    os.path.join(run.args.out_dir, "generation_profile.txt")) or {})
    run.meta.setdefault("hf_times", {})[shape] = hf_times
    del model
    _free()
    return path


def write_report(run: Run) -> None:
    out_dir = run.args.out_dir
    os.makedirs(out_dir, exist_ok=True)
    meta = {**run.meta, "errors": run.errors, "skipped": run.skipped, "seconds": time.perf_counter() - run.t0}
    with open(os.path.join(out_dir, "generation.json"), "w") as f:
        json.dump({"meta": meta, "results": run.rows}, f, indent=2, default=str)
    lines = [f"# Generation throughput ({meta['device']})", "",
             f"prompt {meta['prompt_len']} tokens, {meta['new_tokens']} new tokens forced, sampling T=1, {meta['dtype']}",
             "", "| shape | batch | variant | tokens/s | decode ms/step | prefill ms | transformers tokens/s | speed-up |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in run.rows:
        hf = f"{r['hf_tokens_per_s']:.0f}" if "hf_tokens_per_s" in r else "skipped"
        sp = f"{r['speedup_vs_hf']:.1f}x" if "speedup_vs_hf" in r else "-"
        lines.append(f"| {r['shape']} | {r['batch']} | {r['variant']} | {r['tokens_per_s']:.0f} | "
                     f"{r['decode_ms_per_step']:.2f} | {r['prefill_seconds'] * 1000:.0f} | {hf} | {sp} |")
    for key in sorted(k for k in meta if k.startswith(("tiny_", "attention", "profile")) or k.endswith("_greedy")):
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
    p.add_argument("--batches", default="64,256", help="batch sizes of the 0.5B shape")
    p.add_argument("--batches-7b", default="64,256", help="batch sizes of the 7B shape ('' = skip 7B)")
    p.add_argument("--no-hf-7b", action="store_true", help="skip the transformers baseline at the 7B shape")
    p.add_argument("--no-compile", action="store_true", help="skip the graphs+compile variant")
    p.add_argument("--compile-7b", action="store_true", help="also run graphs+compile at the 7B shape")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--time-budget", type=float, default=390.0, help="seconds after which optional steps are skipped")
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
    run.meta.update(run.guarded("tiny parity", tiny_parity_check, run) or {})
    print(f"tiny parity: {run.meta}", flush=True)
    if args.quick:
        run_shape(run, "tiny", [4, 8], True, True, ["eager"])
        write_report(run)
        return 0
    compile_variant = [] if args.no_compile else ["graphs+compile"]
    path = run_shape(run, "qwen2.5-0.5b", [int(b) for b in args.batches.split(",") if b], True, True,
                     ["graphs", "eager"])
    write_report(run)  # partial results survive a later failure
    if run.in_budget("attention micro-benchmark"):
        run.meta["attention_gqa"] = run.guarded("attention micro-benchmark", attention_microbench, run)
    if args.batches_7b:
        run_shape(run, "qwen2.5-7b", [int(b) for b in args.batches_7b.split(",")], not args.no_hf_7b, False,
                  ["graphs", "eager"] + (compile_variant if args.compile_7b else []))
        write_report(run)
    if compile_variant and path is not None and run.in_budget("0.5b graphs+compile"):
        from verl_mega.models.actor import get_actor_model

        model = get_actor_model(path, torch_dtype=run.dtype, layout=run.layout, device=run.device).model.eval()
        gen = torch.Generator().manual_seed(0)
        prompt_sets = {b: torch.randint(2, SHAPES["qwen2.5-0.5b"]["vocab_size"], (b, args.prompt_len), generator=gen)
                       for b in [int(b) for b in args.batches.split(",") if b]}
        bench_variants(run, "qwen2.5-0.5b", model, prompt_sets, run.meta["hf_times"].get("qwen2.5-0.5b", {}),
                       compile_variant)
    write_report(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
