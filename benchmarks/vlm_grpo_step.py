"""One GRPO step of a vision-language model at the Qwen2.5-VL-3B shape (random weights, no download): tokens/s,
seconds per phase and the vision tower's share of each phase.

    python benchmarks/vlm_grpo_step.py                       # 1 GPU: 16 prompts x 8 samples, one 448x448 image each
    python benchmarks/vlm_grpo_step.py --prompts 16 --n 8 --image 448 --response-len 64:256 --steps 3
    torchrun --nproc-per-node 2 benchmarks/vlm_grpo_step.py --tp 2
    python benchmarks/vlm_grpo_step.py --smoke               # CPU check: a tiny VLM, end to end

The model config is built in code (Qwen2.5-VL-3B-Instruct's config.json values: a 36-layer 2048-wide Qwen2
language model with M-RoPE sections (16, 24, 24), a 32-block 1280-wide vision tower with window attention
and full attention at blocks 7, 15, 23, 31); weights are random (bf16 on CUDA, fp32 on CPU; --dtype overrides;
the pixel values stay fp32 as the processor returns them, the patch embedding casts them). Each prompt is
`--prompt-text` random text tokens plus one image of --image x --image pixels: 448 / 14 = 32 x 32 patches,
merged 2 x 2 into 256 image tokens (pixel_values random: the tower's cost does not depend on the pixels).
Random weights never sample EOS, so every response ends at a length drawn uniformly from --response-len
(the engine's forced-length hook, as benchmarks/throughput.py).

Reported (mean over the measured steps; the first --warmup steps are not measured):
  tokens/s per GPU = (prompt + response tokens of every sequence) / step wall time / GPUs;
  seconds per phase from the trainer's timers: rollout (= reshard + generate), logprob (old with
  --old-logprobs recompute; + reference with --kl; empty otherwise: the update takes its own old log-probs),
  update (forward + backward + optimizer step);
  the vision tower's seconds inside each phase, measured with hooks on the tower (forward: pre/post hooks;
  backward: from the gradient arriving at the tower's output to the patch embedding's weight gradient),
  each synchronised with the device, so the figures include no overlap with other work; in rollout the
  tower runs once per admission step on the images of every prompt admitted in it (here all of them at
  once: the engine's max_batch is prompts x n; the n samples of a prompt share its encoding), in log-prob
  and update once per micro-batch on the images of its distinct prompts (its rows of one prompt share the
  encoding); the table gives the tower's calls per phase beside its seconds; with --kl the
  reference model's own tower runs in the log-prob phase too and is not timed (the phase time includes it).
Rank 0 writes OUT/vlm_grpo_step.json and prints a markdown table (OUT: --out, $OUT or .).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import warnings

sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: benchmarks.*

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from benchmarks.forced_lengths import force_lengths, parse_length_range  # noqa: E402
from verl_mega.models import ModelConfig, build_stage  # noqa: E402
from verl_mega.models.config import VisionConfig  # noqa: E402
from verl_mega.parallel import Layout  # noqa: E402
from verl_mega.parallel.dist import device as comm_device  # noqa: E402
from verl_mega.parallel.dist import init_distributed  # noqa: E402
from verl_mega.rollout.actor import HFActor  # noqa: E402
from verl_mega.testing.vlm_prompts import image_prompts  # noqa: E402
from verl_mega.trainer import PPOTrainer, TrainerConfig  # noqa: E402
from verl_mega.trainer.stages import Pipeline, stage_name  # noqa: E402

QWEN2_5_VL_3B = dict(  # eos_token_id: <|im_end|>, the token forced at the drawn response lengths
    eos_token_id=151645, model_type="qwen2_5_vl", vocab_size=151936, hidden_size=2048, intermediate_size=11008,
    num_layers=36, num_heads=16, num_kv_heads=2, head_dim=128, rope_theta=1_000_000.0, max_position_embeddings=128000,
    tie_word_embeddings=True, attention_bias=True, image_token_id=151655, vision_start_token_id=151652,
    mrope_section=(16, 24, 24),
    vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                fullatt_block_indexes=(7, 15, 23, 31)))
SMOKE = dict(
    eos_token_id=2, model_type="qwen2_5_vl", vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=1024,
    tie_word_embeddings=True, attention_bias=True, image_token_id=290, vision_start_token_id=288, mrope_section=(2, 3, 3),
    vision=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=(1,)))
PHASES = ("rollout", "generate", "reshard", "logprob", "update")
# run sizes: the GPU defaults and the --smoke ones (each flag given on the command line wins)
RUN = dict(prompts=16, n=8, image=448, prompt_text=64, response_len="64:256", new_tokens=256, micro_batch=8, steps=3,
           warmup=1)
SMOKE_RUN = dict(prompts=2, n=2, image=56, prompt_text=6, response_len="2:6", new_tokens=8, micro_batch=2, steps=2,
                 warmup=1)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, help="prompts per step (global; default 16)")
    p.add_argument("--n", type=int, help="samples per prompt (default 8)")
    p.add_argument("--image", type=int, help="image side in pixels, a multiple of 28 (default 448)")
    p.add_argument("--prompt-text", type=int, help="text tokens per prompt besides the image tokens (default 64)")
    p.add_argument("--response-len", help="forced response lengths LO:HI (default 64:256)")
    p.add_argument("--new-tokens", type=int, help="max new tokens (default 256)")
    p.add_argument("--micro-batch", type=int, help="sequences per training micro-batch (default 8)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--kl", action="store_true", help="add a reference model (kl_coef 1e-3): one more log-prob pass")
    p.add_argument("--old-logprobs", choices=("auto", "recompute"), default="auto",
                   help="trainer.old_logprobs: auto (the default) = the on-policy update takes its own, so without "
                        "--kl the log-prob phase is empty; recompute = a separate old-log-prob pass")
    p.add_argument("--steps", type=int, help="steps run (default 3)")
    p.add_argument("--warmup", type=int, help="first steps not measured (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--smoke", action="store_true", help="tiny VLM on CPU, 2 prompts x 2, 56x56 images, 2 steps")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="parameter dtype (auto: bfloat16 on CUDA, float32 on CPU; bfloat16 --smoke checks the bf16 "
                        "path on CPU)")
    args = p.parse_args(argv)
    for key, value in (SMOKE_RUN if args.smoke else RUN).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.image % 28:
        p.error("--image must be a multiple of 28 (14-pixel patches merged 2 x 2)")
    args.response_range = parse_length_range(args.response_len, args.new_tokens)
    return args


def model_config(shape: dict) -> ModelConfig:
    """The ModelConfig of a shape dict (vision tower included)."""
    fields = {k: v for k, v in shape.items() if k != "eos_token_id"}
    return ModelConfig(**{**fields, "vision": VisionConfig(**shape["vision"])},
                       hf_extra={"eos_token_id": shape["eos_token_id"]})


class VisionTimer:
    """Seconds spent in the vision tower per phase (device-synchronised hooks; see the module docstring)."""

    def __init__(self, tower: torch.nn.Module, device: torch.device):
        self.device, self.phase, self.seconds, self.calls = device, "other", {}, {}
        self._start = self._back = None
        tower.register_forward_pre_hook(lambda *_: self._begin())
        tower.register_forward_hook(lambda *_: self._end())
        # the tower's input (pixels) needs no gradient: the pre-hook fires when its output's gradient arrives
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
        tower.register_full_backward_pre_hook(lambda *_: self._begin_backward())
        tower.patch_embed.proj.weight.register_post_accumulate_grad_hook(lambda *_: self._end_backward())

    def _sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _add(self, seconds: float) -> None:
        self.seconds[self.phase] = self.seconds.get(self.phase, 0.0) + seconds
        self.calls[self.phase] = self.calls.get(self.phase, 0) + 1

    def _begin(self) -> None:
        self._start = self._sync()

    def _end(self) -> None:
        self._add(self._sync() - self._start)

    def _begin_backward(self) -> None:
        self._back = self._sync()

    def _end_backward(self) -> None:
        if self._back is not None:
            self._add(self._sync() - self._back)
            self._back = None

    def reset(self) -> None:
        self.seconds, self.calls = {}, {}


class Tagged:
    """A pipeline stage that tells the VisionTimer which phase runs (same name, same result)."""

    def __init__(self, stage, timer: VisionTimer):
        self.stage, self.timer, self.name = stage, timer, stage_name(stage)

    def __call__(self, batch, ctx):
        self.timer.phase = self.name
        try:
            return self.stage(batch, ctx)
        finally:
            self.timer.phase = "other"


def run(args) -> dict:
    """Build the actor and trainer, run the steps; returns the report (the same on every rank)."""
    on_cpu = not torch.cuda.is_available()
    shape = SMOKE if args.smoke else QWEN2_5_VL_3B
    layout = Layout.create(args.tp, 1)
    if args.prompts % layout.dp:
        raise ValueError(f"--prompts {args.prompts} does not split over dp={layout.dp}")
    per_dp = args.prompts // layout.dp
    config = model_config(shape)
    dtype_name = args.dtype if args.dtype != "auto" else ("float32" if on_cpu else "bfloat16")
    dtype = getattr(torch, dtype_name)
    model = build_stage(config, layout, params_dtype=dtype, device=comm_device(), init_seed=args.seed)
    actor = HFActor(model, layout, config, tokenizer=None, path=None)
    cfg = TrainerConfig()
    cfg.model.dtype = dtype_name
    side = args.image // config.vision.patch_size
    image_tokens = side * side // config.vision.spatial_merge_size**2
    # image_prompts: prompt k = (prompt_text + k) text tokens, vision start, the image's tokens, vision end, 2 text
    cfg.data.max_prompt_length = args.prompt_text + (per_dp - 1) + image_tokens + 4
    cfg.rollout.engine.max_batch = per_dp * args.n
    cfg.algorithm.kl_coef = 1e-3 if args.kl else 0.0
    cfg.trainer.old_logprobs = args.old_logprobs
    cfg.trainer.progress_bar = False
    cfg.offload.auto = True  # the planner offloads only what must go (the 3B shape needs optimizer offload on 80 GB)
    trainer = PPOTrainer(actor, reward_fn=lambda r: float(len(r) % 2), algorithm="grpo", rollout_batch_size=per_dp,
                         n_samples=args.n, max_new_tokens=args.new_tokens, temperature=1.0, lr=1e-6,
                         micro_batch_size=args.micro_batch, mini_batch_size=per_dp, num_epochs=1, config=cfg)
    force_lengths(trainer, args.response_range, eos_token_id=shape["eos_token_id"])
    timer = VisionTimer(actor.model.visual, actor.device)
    trainer.pipeline = Pipeline([Tagged(s, timer) for s in trainer.pipeline.stages])
    steps = []
    for step in range(args.steps):
        prompts, images = image_prompts(config, [[(1, side, side)]] * per_dp,
                                        seed=args.seed * 1000 + step * 31 + layout.dp_rank, text_len=args.prompt_text)
        samples = [{"prompt_ids": p, "pixel_values": pv, "image_grid_thw": grid} for p, (pv, grid)
                   in zip(prompts, images)]
        timer.reset()
        if not on_cpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        metrics = trainer.step(samples)
        if not on_cpu:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        if step >= args.warmup:
            steps.append({"wall_s": wall, "tokens": metrics["prompt_length/tokens"] + metrics["response_length/tokens"],
                          "response_tokens": metrics["response_length/tokens"],
                          **{p: metrics.get(f"time/{p}", 0.0) for p in PHASES},
                          **{f"vision_{p}": timer.seconds.get(p, 0.0) for p in ("rollout", "logprob", "update")},
                          **{f"vision_calls_{p}": timer.calls.get(p, 0) for p in ("rollout", "logprob", "update")}})
    return {**summarize(args, steps, layout, config), "offload": dataclasses.asdict(trainer.offload)}


def summarize(args, steps: list[dict], layout: Layout, config: ModelConfig) -> dict:
    mean = {k: statistics.mean(s[k] for s in steps) for k in steps[0]}
    phases = {p: mean[p] for p in ("rollout", "logprob", "update")}
    vision = {p: mean[f"vision_{p}"] for p in phases}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {
        "device": device, "gpus": layout.world_size, "tp": layout.tp, "dtype": args.dtype,
        "shape": "smoke" if args.smoke else "qwen2.5-vl-3b",
        "prompts": args.prompts, "n": args.n, "image_px": args.image, "response_len": args.response_len,
        "steps_measured": len(steps), "step_s": mean["wall_s"], "tokens_per_step": mean["tokens"],
        "tokens_per_s_per_gpu": mean["tokens"] / mean["wall_s"] / layout.world_size,
        "gen_tokens_per_s_per_gpu": mean["response_tokens"] / max(mean["generate"], 1e-9) / layout.world_size,
        "phase_s": phases, "reshard_s": mean["reshard"], "generate_s": mean["generate"],
        "vision_s": vision, "vision_share": {p: vision[p] / phases[p] if phases[p] else 0.0 for p in phases},
        "vision_share_of_step": sum(vision.values()) / mean["wall_s"],
        "vision_calls": {p: mean[f"vision_calls_{p}"] for p in phases},
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }


def markdown(r: dict) -> str:
    rows = ["| phase | seconds | vision tower s | tower calls | vision share |", "|---|---|---|---|---|"]
    for p, s in r["phase_s"].items():
        rows.append(f"| {p} | {s:.3f} | {r['vision_s'][p]:.3f} | {r['vision_calls'][p]:g} | "
                    f"{r['vision_share'][p]:.1%} |")
    head = (f"{r['shape']} on {r['device']} x{r['gpus']} (tp {r['tp']}): {r['prompts']} prompts x {r['n']}, "
            f"{r['image_px']}px image each, responses {r['response_len']}: step {r['step_s']:.2f} s, "
            f"{r['tokens_per_s_per_gpu']:.0f} tokens/s/GPU, vision tower {r['vision_share_of_step']:.1%} of the step")
    return head + "\n\n" + "\n".join(rows) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    init_distributed()
    report = run(args)
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "vlm_grpo_step.json"), "w") as f:
            json.dump(report, f, indent=2)
        print(markdown(report))


if __name__ == "__main__":
    main()
