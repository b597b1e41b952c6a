"""GPU check of the vision-language paths in bf16: what the CPU tests (tests/rollout/test_vlm_bf16.py) cannot run.

    python benchmarks/vlm_gpu_check.py            # CUDA: bf16, fused decode ops, CUDA graphs, gather + paged attention
    python benchmarks/vlm_gpu_check.py --smoke    # CPU: the same checks a CPU has (no graphs, no sync debug mode)

On a tiny random Qwen2.5-VL (testing/tiny_vlm.py) in bf16 on the device, with prompts carrying 2, 1 and 0 images:
1. forward with images vs transformers' bf16 model on the same device: max |logit diff| within
   2 x depth x 2^-8 x max|logit| (the bound of tests/rollout/test_vlm_bf16.py);
2. greedy generation with images: the engine with CUDA graphs equals the engine without them and transformers'
   bf16 greedy, token for token, for each decode attention ("gather", and "paged" where Triton runs); every
   decode step replayed a captured graph (a host sync in the VLM decode step would make the capture fail and
   the engine fall back to eager decoding with a warning: that is reported as a failure);
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

GRIDS = [[(1, 4, 6), (1, 6, 4)], [(1, 4, 4)], []]  # per prompt: images (t, h, w) in patches
NEVER, MAX_NEW = 10_000, 12  # an "EOS" outside the vocabulary: rows run to MAX_NEW
IMG, VS = TINY_VLM_DEFAULTS["image_token_id"], TINY_VLM_DEFAULTS["vision_start_token_id"]
SUPPRESS = [IMG, TINY_VLM_DEFAULTS["video_token_id"]]
DEPTH = TINY_VLM_DEFAULTS["vision_depth"] + TINY_VLM_DEFAULTS["num_layers"]


def stage(path: str, device) -> torch.nn.Module:
    model = build_stage(ModelConfig.from_hf(path), Layout.create(1, 1), params_dtype=torch.bfloat16, device=device,
                        init_seed=None)
    load_hf_weights(model, path)
    return model.eval()


@torch.no_grad()
def check_forward(path: str, hf, device) -> dict:
    b = {k: v.to(device) for k, v in tiny_vlm_batch().items()}
    ids, mask, pv, grid = b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"]
    pos, _ = mrope_position_ids(ids, grid, mask, image_token_id=IMG, vision_start_token_id=VS, spatial_merge_size=2)
    model = stage(path, device)
    ours = model(ids, pos, mask, pixel_values=pv, image_grid_thw=grid)[..., :model.true_vocab_size].float()
    ref = hf(input_ids=ids, attention_mask=mask, pixel_values=pv.to(torch.bfloat16), image_grid_thw=grid,
             mm_token_type_ids=(ids == IMG).int()).logits.float()
    real = mask.bool()
    diff, scale = (ours - ref)[real].abs().max().item(), ref[real].abs().max().item()
    bound = 2 * DEPTH * 2.0**-8 * scale
    return {"ok": diff <= bound, "max_diff": diff, "bound": bound}


@torch.no_grad()
def hf_greedy(hf, prompts, images, device) -> list[list[int]]:
    out = []
    for ids, img in zip(prompts, images):
        x = torch.tensor([ids], device=device)
        kw = {} if img is None else {"pixel_values": img[0].to(device, torch.bfloat16),
                                     "image_grid_thw": img[1].to(device), "mm_token_type_ids": (x == IMG).int()}
        gen = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=MAX_NEW,
                          eos_token_id=NEVER, pad_token_id=0, suppress_tokens=SUPPRESS, top_k=None, top_p=None,
                          temperature=None, **kw)
        out.append(gen[0, len(ids):].tolist())
    return out


def engine_greedy(path: str, device, prompts, images, *, graphs: bool, attention: str, sync_debug: bool) -> dict:
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
            out = engine.generate(prompts, max_new_tokens=MAX_NEW, temperature=0.0, n=2, images=images).responses()
            error = None
        except RuntimeError as exc:  # e.g. the sync debugger's "called a synchronizing CUDA operation"
            out, error = [[], []] * len(prompts), f"{type(exc).__name__}: {exc}"
    fallback = [str(w.message) for w in caught if "CUDA graph capture" in str(w.message)]
    return {"responses": out[::2], "samples_agree": out[::2] == out[1::2], "error": error,
            "graphs_captured": len(engine._graphs), "capture_fallback": fallback}


def run(path: str, device, cuda: bool) -> dict:
    """All the checks on the tiny VLM in `path` (see the module docstring); the report dict."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    prompts, images = image_prompts(ModelConfig.from_hf(path), GRIDS)
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "forward": check_forward(path, hf, device)}
    ref = hf_greedy(hf, prompts, images, device)
    attentions = ["gather"] + (["paged"] if use_triton(torch.empty(0, device=device)) else [])
    ok = report["forward"]["ok"]
    for attention in attentions:
        eager = engine_greedy(path, device, prompts, images, graphs=False, attention=attention, sync_debug=cuda)
        runs = {"eager": eager}
        if cuda:
            runs["graphs"] = engine_greedy(path, device, prompts, images, graphs=True, attention=attention,
                                           sync_debug=False)
        for name, result in runs.items():
            result["equals_transformers"] = result["responses"] == ref
            result["ok"] = (result["error"] is None and result["equals_transformers"] and result["samples_agree"]
                            and not result["capture_fallback"] and (name != "graphs" or result["graphs_captured"] > 0))
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
            print(f"greedy {key[9:]}/{name}: ok={result['ok']} equals_transformers={result['equals_transformers']} "
                  f"graphs={result['graphs_captured']} fallback={result['capture_fallback']} error={result['error']}")
    print("ALL OK" if report["ok"] else "FAILED")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
