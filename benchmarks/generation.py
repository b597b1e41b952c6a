"""Generation throughput: verl_mega's GenerationEngine vs transformers' `generate`, CUDA graphs on/off.

    python benchmarks/generation.py                 # GPU: Qwen2.5-0.5B and 7B shapes (random bf16 weights)
    python benchmarks/generation.py --quick         # CPU smoke run at tiny shapes (no CUDA graphs)

Per case: batch B, prompt length P (random token ids, no padding), exactly N new tokens (EOS
ignored; transformers with min_new_tokens=N), sampling at temperature 1 (no top-k / top-p).
Throughput = B*N new tokens / wall time of one full generate call (prefill included), after a
warm-up call with the same shapes (which also captures the CUDA graphs).

Same weights: the 0.5B model is built with transformers (random init on the GPU), saved, and
loaded by `get_actor_model` from that directory. At the 7B shape (15 GB in bf16) the save/load
round trip is skipped: transformers' model is timed and freed, then our model gets its own random
weights drawn on the GPU (throughput does not depend on the values); --no-hf-7b skips the baseline.
Also checks that greedy decoding gives the same tokens with and without CUDA graphs, and reports
how many greedy tokens agree with transformers' greedy tokens (bf16: rounding may make long
continuations diverge, so this is informational).

Writes $OUT/generation.json and $OUT/generation.md (or --out-dir).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=1000, tie_word_embeddings=True),
}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


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


def time_call(fn, repeats: int = 1) -> float:
    """Best wall time (s) of `repeats` calls of fn (after the caller's warm-up)."""
    best = float("inf")
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_hf(model, prompts: torch.Tensor, new_tokens: int) -> float:
    """Seconds for transformers' sampled generate of exactly new_tokens tokens."""
    kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=1)
    attn = torch.ones_like(prompts)
    with torch.no_grad():
        model.generate(prompts, attention_mask=attn, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        return time_call(lambda: model.generate(prompts, attention_mask=attn, max_new_tokens=new_tokens,
                                                min_new_tokens=new_tokens, **kw))


def bench_ours(model, tp_group, prompts: list[list[int]], new_tokens: int, graphs: bool, repeats: int) -> dict:
    """Seconds for our sampled generate (EOS ignored); warm-up call first (captures the graphs)."""
    from verl_mega.rollout.engine import GenerationEngine

    engine = GenerationEngine(model, tp_group, max_batch=len(prompts), max_seq_len=len(prompts[0]) + new_tokens,
                              eos_token_ids=[1], pad_token_id=0, use_cuda_graph=graphs)
    kw = dict(max_new_tokens=new_tokens, temperature=1.0, ignore_eos=True)
    t_warm = time_call(lambda: engine.generate(prompts, seed=1, **kw))
    seconds = time_call(lambda: engine.generate(prompts, seed=2, **kw), repeats)
    prefill = time_call(lambda: engine.generate(prompts, max_new_tokens=1, temperature=1.0, ignore_eos=True))
    out = {"seconds": seconds, "first_call_seconds": t_warm, "prefill_seconds": prefill,
           "decode_ms_per_step": 1000 * (seconds - prefill) / max(1, new_tokens - 1),
           "graphs_captured": len(engine._graphs), "kv_cache_gib": engine.cache.memory_bytes() / 2**30}
    engine.release()
    return out


def greedy_checks(model, tp_group, hf_model, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy tokens: graphs vs eager (must be identical) and agreement with transformers (informational)."""
    from verl_mega.rollout.engine import GenerationEngine

    res = {}
    outs = {}
    for graphs in ([True, False] if torch.cuda.is_available() else [False]):
        engine = GenerationEngine(model, tp_group, max_batch=len(prompts), max_seq_len=len(prompts[0]) + new_tokens,
                                  eos_token_ids=[1], pad_token_id=0, use_cuda_graph=graphs)
        outs[graphs] = engine.generate(prompts, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True).response_ids
        engine.release()
    if True in outs:
        res["graph_equals_eager_greedy"] = bool(torch.equal(outs[True], outs[False]))
    if hf_model is not None:
        ids = torch.tensor(prompts, device=next(hf_model.parameters()).device)
        with torch.no_grad():
            ref = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, pad_token_id=0, eos_token_id=1,
                                    top_k=None, top_p=None, temperature=None)[:, ids.shape[1]:].cpu()
        ours = outs[False]
        prefix = [(int((a != b).nonzero()[0]) if (a != b).any() else len(a)) for a, b in zip(ours, ref)]
        res["hf_greedy_first_token_agreement"] = sum(p > 0 for p in prefix) / len(prefix)
        res["hf_greedy_mean_matching_prefix"] = sum(prefix) / len(prefix)
        res["hf_greedy_tokens_compared"] = new_tokens
    return res


def run_shape(shape: str, layout, batches: list[int], prompt_len: int, new_tokens: int, with_hf: bool,
              same_weights: bool, device: torch.device, dtype: torch.dtype, repeats: int) -> list[dict]:
    """All cases of one model shape. same_weights: save the HF model and load ours from it (else
    ours gets its own random weights on the GPU; timings do not depend on the values)."""
    from verl_mega.models.actor import get_actor_model

    vocab = SHAPES[shape]["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    prompt_sets = {b: torch.randint(2, vocab, (b, prompt_len), generator=gen) for b in batches}
    rows, hf_times, hf_model, model = [], {}, None, None
    if with_hf:
        hf_model = build_hf(shape, device, dtype)
        for b in batches:
            hf_times[b] = _guarded(f"[{shape}] transformers b={b}", bench_hf, hf_model, prompt_sets[b].to(device), new_tokens)
            if hf_times[b] is not None:
                print(f"[{shape}] transformers b={b}: {b * new_tokens / hf_times[b]:.0f} tok/s", flush=True)
        if same_weights:
            tmp = tempfile.mkdtemp(prefix=f"bench_{shape}_")
            hf_model.save_pretrained(tmp)
            model = get_actor_model(tmp, torch_dtype=dtype, layout=layout).model.eval()
        else:
            hf_model = _free(hf_model)
    if model is None:
        model = build_ours_random(shape, layout, device, dtype)
    checks = _guarded(f"[{shape}] greedy checks", greedy_checks, model, layout.tp_group, hf_model,
                      prompt_sets[batches[0]][:16].tolist(), 32) or {}
    hf_model = _free(hf_model)
    for b in batches:
        prompts = prompt_sets[b].tolist()
        for graphs in ([True, False] if torch.cuda.is_available() else [False]):
            r = _guarded(f"[{shape}] ours b={b} graphs={graphs}", bench_ours, model, layout.tp_group, prompts,
                         new_tokens, graphs, repeats)
            if r is None:
                continue
            tok_s = b * new_tokens / r["seconds"]
            row = {"shape": shape, "batch": b, "prompt_len": prompt_len, "new_tokens": new_tokens,
                   "cuda_graph": graphs, "tokens_per_s": tok_s, **r, **checks}
            if hf_times.get(b):
                row["hf_seconds"] = hf_times[b]
                row["hf_tokens_per_s"] = b * new_tokens / hf_times[b]
                row["speedup_vs_hf"] = hf_times[b] / r["seconds"]
            rows.append(row)
            print(f"[{shape}] ours b={b} graphs={graphs}: {tok_s:.0f} tok/s "
                  f"(decode {r['decode_ms_per_step']:.2f} ms/step, prefill {r['prefill_seconds'] * 1000:.0f} ms, "
                  f"{r['graphs_captured']} graphs)"
                  + (f", {row['speedup_vs_hf']:.1f}x transformers" if "speedup_vs_hf" in row else ""), flush=True)
    _free(model)
    return rows


ERRORS: list[str] = []


def _guarded(what: str, fn, *args):
    """fn(*args), or None with the error recorded (one failing case does not lose the others)."""
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported in the output files
        import traceback

        traceback.print_exc()
        ERRORS.append(f"{what}: {exc!r}")
        return None


def _free(obj) -> None:
    del obj
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return None


def write_report(rows: list[dict], meta: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "generation.json"), "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=2)
    lines = [f"# Generation throughput ({meta['device']})", "",
             f"prompt {meta['prompt_len']} tokens, {meta['new_tokens']} new tokens forced, sampling T=1, {meta['dtype']}", "",
             "| shape | batch | CUDA graph | tokens/s | decode ms/step | prefill ms | transformers tokens/s | speed-up |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        hf = f"{r['hf_tokens_per_s']:.0f}" if "hf_tokens_per_s" in r else "skipped"
        sp = f"{r['speedup_vs_hf']:.1f}x" if "speedup_vs_hf" in r else "-"
        lines.append(f"| {r['shape']} | {r['batch']} | {'on' if r['cuda_graph'] else 'off'} | {r['tokens_per_s']:.0f} | "
                     f"{r['decode_ms_per_step']:.2f} | {r['prefill_seconds'] * 1000:.0f} | {hf} | {sp} |")
    checks = {k: v for k, v in rows[0].items() if k.startswith(("graph_equals", "hf_greedy"))} if rows else {}
    lines += ["", f"greedy checks ({rows[0]['shape'] if rows else ''}): {json.dumps(checks)}"]
    if meta.get("errors"):
        lines += ["", "errors:"] + [f"- {e}" for e in meta["errors"]]
    with open(os.path.join(out_dir, "generation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes on CPU (smoke test)")
    p.add_argument("--out-dir", default=os.environ.get("OUT", "outputs"))
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batches", default="64,256", help="batch sizes of the 0.5B shape")
    p.add_argument("--batches-7b", default="64,256", help="batch sizes of the 7B shape ('' = skip 7B)")
    p.add_argument("--no-hf-7b", action="store_true", help="skip the transformers baseline at the 7B shape")
    p.add_argument("--repeats", type=int, default=1)
    args = p.parse_args(argv)

    from verl_mega.parallel.layout import Layout

    layout = Layout.create(tp=1, pp=1)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.quick:
        plan = [("tiny", [4, 8], True, True)]
        args.prompt_len, args.new_tokens = min(args.prompt_len, 16), min(args.new_tokens, 8)
    else:
        plan = [("qwen2.5-0.5b", [int(b) for b in args.batches.split(",") if b], True, True)]
        if args.batches_7b:
            plan.append(("qwen2.5-7b", [int(b) for b in args.batches_7b.split(",")], not args.no_hf_7b, False))
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "dtype": str(dtype).removeprefix("torch."), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}
    t0 = time.perf_counter()
    rows = []
    for shape, batches, with_hf, same_weights in plan:
        rows += run_shape(shape, layout, batches, args.prompt_len, args.new_tokens, with_hf, same_weights, device,
                          dtype, args.repeats)
        write_report(rows, {**meta, "errors": ERRORS}, args.out_dir)  # partial results survive a later failure
    meta["total_seconds"] = time.perf_counter() - t0
    meta["errors"] = ERRORS
    write_report(rows, meta, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
