"""GPU check of the vision-language paths in bf16: what the CPU tests (tests/rollout/test_vlm_bf16.py) cannot run.

    python benchmarks/vlm_gpu_check.py            # CUDA: bf16, fused decode ops, CUDA graphs, gather + paged attention
    python benchmarks/vlm_gpu_check.py --smoke    # CPU: the same checks a CPU has (no graphs, no sync debug mode)

On a tiny random Qwen2.5-VL (testing/tiny_vlm.py) in bf16 on the device, with prompts carrying 2, 1 and 0 images:
1. forward with images vs transformers' bf16 model on the same device: max |logit diff| within the bound
   B = 2 x depth x 2^-8 x max|logit| (the bound of tests/rollout/test_vlm_bf16.py);
2. greedy generation with images, for each decode attention ("gather", and "paged" where Triton runs), eager and
   (CUDA) with CUDA graphs, checked teacher-forced: transformers' bf16 model runs one forward (with the images) on
   [prompt + our greedy response], and at every response step t (image / video pads suppressed, as in its greedy)
   - our token t is within 2B of its best logit (`worst_margin`: max over steps of (best - ours) / 2B), and
   - our engine's log-prob of token t is within 2B of its log-prob (`worst_logprob_diff`: max |diff| / 2B);
   `consistent` = both <= 1 at every step (derivation at TOLERANCE). Further, the graphs run gives the eager
   run's tokens exactly (same attention kernel, same arithmetic; gather vs paged may part at a near tie), the 2
   samples of a prompt agree, and every decode step replayed a captured graph (a host sync in the VLM decode step
   would make the capture fail and the engine fall back to eager decoding with a warning: reported as a failure).
   `first_divergence_from_hf_greedy` (per prompt: the first step where our tokens differ from transformers'
   greedy `generate`, or None) is reported, not checked: on a random tiny model two implementations whose
   logits differ within B may part at a near tie, and then differ at every later step (other prefixes);
3. the eager decode step under `torch.cuda.set_sync_debug_mode("error")`: no device -> host sync in it.
Writes OUT/vlm_gpu_check.json (OUT: --out, $OUT or .), prints one line per check; exit status 1 if one fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings

sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

import torch  # noqa: E402

from verl_mega.kernels import use_triton  # noqa: E402
from verl_mega.models import ModelConfig, build_stage, load_hf_weights  # noqa: E402
from verl_mega.models.mrope import mrope_position_ids  # noqa: E402
from verl_mega.parallel import Layout  # noqa: E402
from verl_mega.rollout.engine import GenerationEngine  # noqa: E402
from verl_mega.rollout.engine_config import EngineConfig  # noqa: E402
from verl_mega.testing.tiny_vlm import TINY_VLM_DEFAULTS, make_tiny_qwen2_5_vl, tiny_vlm_batch  # noqa: E402
from verl_mega.testing.vlm_prompts import image_prompts  # noqa: E402

# per prompt: images (t, h, w) in patches; large enough that the prompts' M-RoPE deltas (per image of h x w patches
# max(h, w) / 2 - h * w / 4, in merged tokens) are -16, -18, 0: a decode step that drops the delta then moves the
# tiny model's logits beyond 2B (with the earlier 4x6 / 4x4 images, deltas -6 / -2: in 2 of 3 seeds)
GRIDS = [[(1, 8, 8), (1, 4, 8)], [(1, 8, 12)], []]
NEVER, MAX_NEW = 10_000, 12  # an "EOS" outside the vocabulary: rows run to MAX_NEW
IMG, VS = TINY_VLM_DEFAULTS["image_token_id"], TINY_VLM_DEFAULTS["vision_start_token_id"]
SUPPRESS = [IMG, TINY_VLM_DEFAULTS["video_token_id"]]
DEPTH = TINY_VLM_DEFAULTS["vision_depth"] + TINY_VLM_DEFAULTS["num_layers"]
# Teacher-forced tolerance, in units of the forward bound B = bf16_bound(max|logit|). The forward check asserts
# |ours_k - hf_k| <= B for every logit k of the same input (each side rounds to bf16 independently; our decode step
# runs the same layers in bf16 and obeys the same bound). Tokens: our greedy token o is our argmax, ours_o >= ours_h
# for HF's argmax h, so hf_h - hf_o = (hf_h - ours_h) + (ours_h - ours_o) + (ours_o - hf_o) <= B + 0 + B = 2B.
# Log-probs: lp_o = l_o - logsumexp(l), logsumexp moves by at most max_k |dl_k| <= B, so |dlp_o| <= B + B = 2B.
# A correct engine stays within 2B at every step (measured on CPU: token margin 0, log-prob diff <= 0.11 x 2B).
# Bugs injected into the decode step (wrapping GenerationEngine._decode_forward; CPU, tiny VLM seeds 1-3) exceed
# it in 3 of 3 seeds each (the worse of the two criteria, x 2B): a zero M-RoPE delta 1.8-3.1, the KV written one
# slot off 1.4-3.7, positions one step stale 1.2-3.3, a stale token buffer 13-17. A random 2-layer model depends
# weakly on position, hence the modest factors; the log-prob criterion catches the stale positions the token one
# misses (token margin 0.6-0.7 in 2 seeds).
TOLERANCE = 2  # x B


def stage(path: str, device) -> torch.nn.Module:
    """Our bf16 stage (tp = pp = 1) of the HF directory `path` on `device`, in eval mode."""
    model = build_stage(ModelConfig.from_hf(path), Layout.create(1, 1), params_dtype=torch.bfloat16, device=device,
                        init_seed=None)
    load_hf_weights(model, path)
    return model.eval()


@torch.no_grad()
def check_forward(path: str, hf, device) -> dict:
    """Check 1: our forward with images vs transformers' `hf` on tiny_vlm_batch(); {"ok", "max_diff", "bound"}."""
    b = {k: v.to(device) for k, v in tiny_vlm_batch().items()}
    ids, mask, pv, grid = b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"]
    pos, _ = mrope_position_ids(ids, grid, mask, image_token_id=IMG, vision_start_token_id=VS, spatial_merge_size=2)
    model = stage(path, device)
    ours = model(ids, pos, mask, pixel_values=pv, image_grid_thw=grid)[..., :model.true_vocab_size].float()
    ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pv.to(torch.bfloat16), image_grid_thw=grid,
             mm_token_type_ids=(ids == IMG).int()).logits.float()
    real = mask.bool()
    diff, bound = (ours - ref)[real].abs().max().item(), bf16_bound(ref[real].abs().max().item())
    return {"ok": diff <= bound, "max_diff": diff, "bound": bound}


def bf16_bound(scale: float) -> float:
    """Bound on |ours - transformers| of bf16 logits of magnitude `scale` after DEPTH layers (2 x depth x 2^-8 x
    scale: each layer rounds its O(1) activations to bf16, each side independently; tests/rollout/test_vlm_bf16.py)."""
    return 2 * DEPTH * 2.0**-8 * scale


def hf_inputs(ids: list[int], img, device) -> dict:
    """transformers' inputs for one unpadded row `ids` with its images `img` ((pixel_values, grid) or None)."""
    x = torch.tensor([ids], device=device)
    kw = {} if img is None else {"pixel_values": img[0].to(device, torch.bfloat16), "image_grid_thw": img[1].to(device),
                                 "mm_token_type_ids": (x == IMG).int()}
    return {"input_ids": x, "attention_mask": torch.ones_like(x), **kw}


@torch.no_grad()
def hf_greedy(hf, prompts, images, device) -> list[list[int]]:
    """transformers' bf16 greedy `generate`, MAX_NEW tokens per prompt, the image / video pad tokens suppressed."""
    out = []
    for ids, img in zip(prompts, images):
        gen = hf.generate(**hf_inputs(ids, img, device), do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=NEVER,
                          pad_token_id=0, suppress_tokens=SUPPRESS, top_k=None, top_p=None, temperature=None)
        out.append(gen[0, len(ids):].tolist())
    return out


@torch.no_grad()
def teacher_forced(hf, prompts, images, responses, logprobs, device) -> list[dict]:
    """Per prompt, transformers' bf16 model on [prompt + our response] in one forward (with the images); at each
    response step t its next-token logits l [V] (pad tokens at -inf, as `hf_greedy` and our engine suppress them):
    `margins` [R] = (max(l) - l[our token t]) / tol and `logprob_diffs` [R] = |log_softmax(l)[our token t] - our
    log-prob t| / tol, tol = TOLERANCE x B of these logits (`tolerance`); a step is consistent if both are <= 1.
    A response holding a pad token (HF would read it as an image) is forced up to it; that step counts inf."""
    out = []
    for ids, img, resp, lps in zip(prompts, images, responses, logprobs):
        cut = next((t for t, tok in enumerate(resp) if tok in SUPPRESS), len(resp))
        logits = hf(**hf_inputs(ids + resp[:cut], img, device)).logits[0].float()  # [P + cut, V]
        tol = TOLERANCE * bf16_bound(logits.abs().max().item())
        steps = logits[len(ids) - 1:len(ids) - 1 + cut].clone()  # [cut, V]: row t predicts resp[t]
        steps[:, SUPPRESS] = -torch.inf
        ours = torch.tensor(resp[:cut], device=device)[:, None]  # [cut, 1]
        margins = (steps.max(1).values - steps.gather(1, ours)[:, 0]) / tol  # [cut]
        hf_lp = torch.log_softmax(steps, dim=1).gather(1, ours)[:, 0]  # [cut]
        lp_diffs = (hf_lp - torch.tensor(lps[:cut], device=device)).abs() / tol  # [cut]
        tail = [float("inf")] * (cut < len(resp))
        out.append({"margins": margins.tolist() + tail, "logprob_diffs": lp_diffs.tolist() + tail, "tolerance": tol})
    return out


def first_divergence(ours: list[int], ref: list[int]) -> int | None:
    """The first index where token lists `ours` and `ref` differ (one ending early counts), or None."""
    return next((t for t, (a, b) in enumerate(zip(ours, ref)) if a != b), None if len(ours) == len(ref)
                else min(len(ours), len(ref)))


def engine_greedy(path: str, device, prompts, images, *, graphs: bool, attention: str, sync_debug: bool) -> dict:
    """Our engine's greedy generation, 2 samples per prompt: {"responses", "logprobs" (of sample 0 per prompt),
    "samples_agree", "error", "graphs_captured", "capture_fallback" (the capture-failure warnings)}."""
    config = EngineConfig(max_batch=8, max_seq_len=128, max_tokens=2048, block_size=4, kv_len_bucket=16,
                          cuda_graph=graphs, attention=attention)
    engine = GenerationEngine(stage(path, device), None, config, eos_token_ids=[NEVER], pad_token_id=0)
    if sync_debug:  # eager decode steps under the sync debugger: a device -> host sync raises
        decode_forward = engine._decode_forward

        def guarded(bb, nb):
            torch.cuda.set_sync_debug_mode("error")
            try:
                decode_forward(bb, nb)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        engine._decode_forward = guarded
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            gen = engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=0.0, n=2, images=images)
            out, error = gen.responses(), None
            logprobs = [gen.response_logprobs[i, :len(r)].tolist() for i, r in enumerate(out)]
        except RuntimeError as exc:  # e.g. the sync debugger's "called a synchronizing CUDA operation"
            out, error = [[], []] * len(prompts), f"{type(exc).__name__}: {exc}"
            logprobs = out
    fallback = [str(w.message) for w in caught if "CUDA graph capture" in str(w.message)]
    return {"responses": out[::2], "logprobs": logprobs[::2], "samples_agree": out[::2] == out[1::2], "error": error,
            "graphs_captured": len(engine._graphs), "capture_fallback": fallback}


def check_greedy(result: dict, hf, prompts, images, ref, device, *, graphs: bool) -> None:
    """Adds to an `engine_greedy` result the teacher-forced check of its responses against transformers
    (`consistent`, `worst_margin`, `worst_logprob_diff`, per prompt `margins`, `logprob_diffs`, `tolerance`),
    `first_divergence_from_hf_greedy` against transformers' greedy `ref`, and `ok` (with, for a `graphs` run,
    its `equals_eager`)."""
    result["first_divergence_from_hf_greedy"] = [first_divergence(r, h) for r, h in zip(result["responses"], ref)]
    result["worst_margin"] = result["worst_logprob_diff"] = None
    result["consistent"] = False
    if result["error"] is None:
        forced = teacher_forced(hf, prompts, images, result["responses"], result["logprobs"], device)
        for key in ("margins", "logprob_diffs"):
            result[key] = [[round(m, 4) for m in f[key]] for f in forced]
        result["tolerance"] = [f["tolerance"] for f in forced]
        result["worst_margin"] = max(m for f in forced for m in f["margins"])
        result["worst_logprob_diff"] = max(m for f in forced for m in f["logprob_diffs"])
        result["consistent"] = (result["worst_margin"] <= 1 and result["worst_logprob_diff"] <= 1
                                and all(len(r) == MAX_NEW for r in result["responses"]))
    result["ok"] = (result["error"] is None and result["consistent"] and result["samples_agree"]
                    and not result["capture_fallback"]
                    and (not graphs or (result["graphs_captured"] > 0 and result["equals_eager"])))


def run(path: str, device, cuda: bool) -> dict:
    """All the checks on the tiny VLM in `path` (see the module docstring); the report dict."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    prompts, images = image_prompts(ModelConfig.from_hf(path), GRIDS)
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "forward": check_forward(path, hf, device)}
    report["hf_greedy"] = ref = hf_greedy(hf, prompts, images, device)
    attentions = ["gather"] + (["paged"] if use_triton(torch.empty(0, device=device)) else [])
    ok = report["forward"]["ok"]
    for attention in attentions:
        eager = engine_greedy(path, device, prompts, images, graphs=False, attention=attention, sync_debug=cuda)
        runs = {"eager": eager}
        if cuda:
            runs["graphs"] = engine_greedy(path, device, prompts, images, graphs=True, attention=attention,
                                           sync_debug=False)
        if "graphs" in runs:  # same attention kernel, same arithmetic: replaying graphs changes no token
            runs["graphs"]["equals_eager"] = runs["graphs"]["responses"] == eager["responses"]
        for name, result in runs.items():
            check_greedy(result, hf, prompts, images, ref, device, graphs=name == "graphs")
            ok = ok and result["ok"]
        report[f"generate_{attention}"] = runs
    report["ok"] = ok
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="run on CPU (no CUDA graphs, no sync debug mode)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        report = run(make_tiny_qwen2_5_vl(tmp, seed=1), device, cuda)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "vlm_gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(f"forward vs transformers (bf16): {report['forward']}")
    for key in (k for k in report if k.startswith("generate_")):
        for name, result in report[key].items():
            worst = ["n/a" if result[k] is None else f"{result[k]:.3f}" for k in ("worst_margin", "worst_logprob_diff")]
            print(f"greedy {key[9:]}/{name}: ok={result['ok']} consistent={result['consistent']} "
                  f"worst_margin={worst[0]} worst_logprob_diff={worst[1]} (x 2B) "
                  f"first_divergence_from_hf_greedy={result['first_divergence_from_hf_greedy']} "
                  f"samples_agree={result['samples_agree']} equals_eager={result.get('equals_eager', 'n/a')} "
                  f"graphs={result['graphs_captured']} fallback={result['capture_fallback']} error={result['error']}")
    print("ALL OK" if report["ok"] else "FAILED")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
