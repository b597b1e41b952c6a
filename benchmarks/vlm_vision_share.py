"""Share of the Qwen2.5-VL vision tower in a training micro-batch and in a prefill (the TP choice for the tower).

Run (GPU):  python benchmarks/vlm_vision_share.py              (Qwen2.5-VL-3B shape, random weights, bf16)
CPU check:  python benchmarks/vlm_vision_share.py --smoke      (the tiny test VLM, fp32, median of 5 iterations)

One GPU, tp = 1. Per micro-batch of --micro-batch sequences, each with one --image x --image image
(448 -> a 32 x 32 patch grid -> 256 placeholder tokens), --prompt-text text tokens and --response
response tokens, it times (median of --iters after one warm-up):
- "train_full": forward + backward of the whole model with pixel_values (the tower encodes every row's image);
- "train_vision": forward + backward of the tower alone on the same images (surrogate loss sum(embeds * R));
- "train_shared": forward + backward of the whole model when the rows are --n samples of fewer prompts and each
  distinct image is encoded once (image_embeds repeated; autograd sums the copies' gradients);
- "prefill": forward (no grad) of the whole model on the prompts only (rollout prefill, images encoded once);
- "prefill_vision": the tower's forward in that prefill.
Reported: milliseconds, and the vision shares train_vision / train_full and prefill_vision / prefill. With
the tower replicated over tp ranks, each rank repeats it: sharding it over tp could save at most
share * (1 - 1/tp) of that phase (minus two all-reduces per vision block). Writes $OUT/vlm_vision_share.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from verl_mega.models import ModelConfig, build_stage, mrope_position_ids
from verl_mega.models.norm import RMSNorm
from verl_mega.parallel import Layout

QWEN2_5_VL_3B = {  # the published Qwen2.5-VL-3B-Instruct config.json (flat form), as in tests/models/test_vlm.py
    "model_type": "qwen2_5_vl", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
    "num_attention_heads": 16, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "max_position_embeddings": 128000, "tie_word_embeddings": True, "vocab_size": 151936,
    "image_token_id": 151655, "vision_start_token_id": 151652,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                      "temporal_patch_size": 2},
}


def tiny_config() -> dict:
    from verl_mega.testing.tiny_vlm import tiny_vlm_config

    return tiny_vlm_config().to_dict()


@torch.no_grad()
def random_init(model: torch.nn.Module) -> None:
    """Norm weights 1, others N(0, 0.02), drawn on the model's device (no CPU round trip at 3B)."""
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    for p in model.parameters():
        p.fill_(1.0) if id(p) in norms else p.normal_(0.0, 0.02)


def make_batch(config: ModelConfig, rows: int, image: int, prompt_text: int, response: int, device, dtype, seed=0):
    """input_ids [rows, S] (text, <vision_start>, image tokens, text, response), pixel_values, image_grid_thw
    (kept on the host, where the vision tower reads it: on the GPU it would cost a device -> host copy)."""
    v = config.vision
    side = image // v.patch_size
    grid = torch.tensor([[1, side, side]] * rows)
    n_img = side * side // v.spatial_merge_size ** 2
    gen = torch.Generator().manual_seed(seed)
    top = min(1000, config.vision_start_token_id, config.image_token_id)  # plain text ids
    text = lambda n: torch.randint(0, top, (rows, n), generator=gen)  # noqa: E731
    ids = torch.cat([text(4), torch.full((rows, 1), config.vision_start_token_id),
                     torch.full((rows, n_img), config.image_token_id), text(prompt_text + response)], dim=1)
    patch = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    pixels = torch.randn(rows * side * side, patch, generator=gen)
    return ids.to(device), pixels.to(device, dtype), grid


def timed(fn, iters: int, device) -> float:
    """Median milliseconds of fn() over `iters` runs after one warm-up."""
    fn()
    out = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny VLM on CPU, fp32, median of 5 iterations")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--n", type=int, default=8, help="samples per prompt (train_shared: micro_batch / n prompts)")
    p.add_argument("--image", type=int, default=448)
    p.add_argument("--prompt-text", type=int, default=64)
    p.add_argument("--response", type=int, default=256)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.smoke:
        # 5 iterations: the median of ~ms timings survives a hiccup of the shared CPU (one run can take 10x)
        args.image, args.prompt_text, args.response, args.iters, args.micro_batch, args.n = 56, 8, 8, 5, 4, 2
    config = ModelConfig.from_hf(tiny_config() if args.smoke else QWEN2_5_VL_3B)
    layout = Layout.create(1, 1)
    model = build_stage(config, layout, params_dtype=dtype, device=device, init_seed=0 if args.smoke else None)
    if not args.smoke:
        random_init(model)
    mb = args.micro_batch
    ids, pixels, grid = make_batch(config, mb, args.image, args.prompt_text, args.response, device, dtype)
    mrope = dict(image_token_id=config.image_token_id, spatial_merge_size=config.vision.spatial_merge_size)
    pos = mrope_position_ids(ids, grid, **mrope)[0]
    prompt_len = ids.shape[1] - args.response

    def train_full():
        model.zero_grad(set_to_none=True)
        model(ids, pos, pixel_values=pixels, image_grid_thw=grid).float().mean().backward()

    def train_vision():
        model.zero_grad(set_to_none=True)
        embeds = model.encode_images(pixels, grid)
        (embeds.float() * 1e-3).sum().backward()

    prompts = max(mb // args.n, 1)
    per_prompt = pixels.shape[0] // mb

    def train_shared():  # each prompt's image encoded once, its embeddings repeated for its n samples
        model.zero_grad(set_to_none=True)
        embeds = model.encode_images(pixels[: prompts * per_prompt], grid[:prompts])  # [prompts * tokens, H]
        embeds = embeds.view(prompts, -1, embeds.shape[-1]).repeat_interleave(mb // prompts, 0).flatten(0, 1)
        model(ids, pos, image_embeds=embeds).float().mean().backward()

    p_ids, p_pos = ids[:prompts, :prompt_len], pos[:, :prompts, :prompt_len]
    p_pix, p_grid = pixels[: prompts * per_prompt], grid[:prompts]

    @torch.no_grad()
    def prefill():
        model(p_ids, p_pos, pixel_values=p_pix, image_grid_thw=p_grid)

    @torch.no_grad()
    def prefill_vision():
        model.encode_images(p_pix, p_grid)

    res = {name: timed(fn, args.iters, device) for name, fn in
           [("train_full", train_full), ("train_vision", train_vision), ("train_shared", train_shared),
            ("prefill", prefill), ("prefill_vision", prefill_vision)]}
    res["share_train_per_sample"] = res["train_vision"] / res["train_full"]
    res["share_prefill"] = res["prefill_vision"] / res["prefill"]
    record = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "dtype": str(dtype),
              "shape": "tiny" if args.smoke else "qwen2.5-vl-3b", "micro_batch": mb, "n": args.n,
              "image": args.image, "seq": ids.shape[1], "prompt_len": prompt_len,
              "image_tokens": int((ids[0] == config.image_token_id).sum()), "ms": res}
    print(json.dumps(record, indent=2))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "vlm_vision_share.json"), "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
