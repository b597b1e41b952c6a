"""`verl-mega demo --task vision`: a tiny random vision-language model (Qwen2.5-VL architecture) learns to
answer a question about a synthetic image: supervised to a weak start, then GRPO; held-out greedy accuracy
before and after RL.

    verl-mega demo --task vision            # 2 processes, tp 2 (spawned), CPU
    verl-mega demo --task vision --quick    # CI smoke run (tests/trainer/test_vlm_demo.py)

Steps (every rank runs them; rank 0 writes files and prints), the text demo's (apps/demo.py) with images:
 1. the task (apps/demo_vision_task.py: images drawn by the code, a question, a one-token answer) written
    to verl's multimodal parquet (images as PNG bytes) -> train.parquet / heldout.parquet; a random tiny
    Qwen2.5-VL (`testing.tiny_vlm.make_tiny_qwen2_5_vl`) with the tiny processor
    (`testing.tiny_vl_processor.save_tiny_vl_processor`) in one directory -> model_init/;
 2. the parquet read through the real data path (`RLDataset` with the model's image processor: pixels
    resized and normalised by transformers, image pads expanded); SFT on the answers with the images
    (`TrainEngine`, micro-batches carrying pixel_values / image_grid_thw / 3-axis M-RoPE positions) until
    greedy accuracy on a probe of TRAINING prompts reaches --sft-target (a weak start, so RL has room)
    -> model_sft/;
 3. GRPO with `PPOTrainer.fit` from model_sft/: rollout with the images (one vision encoding per prompt,
    shared by its n samples), old log-probs and the update with them; held-out greedy accuracy before RL,
    every --val-every steps and at the end (metrics.jsonl, reward_curve.png, summary.json).
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist

from verl_mega.apps.demo import _say  # rank 0 prints (the text demo's helper)

# task size, model size and training knobs (the command line overrides them; QUICK for the CI smoke run)
DEFAULTS = dict(train=2000, heldout=200, sft_target=0.4, sft_max_steps=400, sft_lr=1e-3, sft_batch=32, sft_every=5,
                rl_steps=40, rl_lr=1e-3, rollout_batch=32, n_samples=8, val_every=10, hidden=64, layers=2,
                vision_hidden=32, vision_depth=2)
QUICK = dict(train=64, heldout=16, sft_target=1.0, sft_max_steps=4, sft_every=2, rl_steps=2, rollout_batch=4,
             n_samples=2, val_every=1)
MAX_NEW_TOKENS = 3  # the answer, EOS, one token of slack


def make_model_dir(path: str, args) -> None:
    """A random tiny Qwen2.5-VL with the tiny processor (tokenizer, chat template, image processor) in `path`."""
    from verl_mega.testing.tiny_vl_processor import save_tiny_vl_processor
    from verl_mega.testing.tiny_vlm import make_tiny_qwen2_5_vl

    ids = save_tiny_vl_processor(path)  # the token ids the model config needs
    make_tiny_qwen2_5_vl(path, seed=args.seed, **ids, hidden_size=args.hidden, num_layers=args.layers,
                         vision_hidden_size=args.vision_hidden, vision_depth=args.vision_depth,
                         fullatt_block_indexes=(args.vision_depth - 1,))


def sft_microbatch(items: list[dict], answers: list[str], tokenizer, image_tokens) -> dict[str, torch.Tensor]:
    """One next-token micro-batch: each prompt (image pads expanded) + its answer + EOS, right-padded; the loss on
    the answer and EOS. Carries the images (pixel_values, image_grid_thw) and 3-axis positions [3, B, S]."""
    from verl_mega.apps.demo_task import right_pad_supervised
    from verl_mega.trainer.batch import sample_images

    seqs, targets = [], []
    for item, answer in zip(items, answers):
        tail = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        seqs.append(list(item["prompt_ids"]) + tail)
        targets.append([0] * len(item["prompt_ids"]) + [1] * len(tail))
    ids, mask, loss_mask = right_pad_supervised(seqs, targets, tokenizer.pad_token_id)
    pixel_values, grids = sample_images(items)
    grid = torch.cat([g for g in grids if g is not None])
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask,
            "labels": torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], dim=1),
            "position_ids": image_tokens.position_ids(ids, grid, mask),
            "pixel_values": torch.cat([p for p in pixel_values if p is not None]), "image_grid_thw": grid}


@torch.no_grad()
def accuracy(actor, items: list[dict], score) -> float:
    """Greedy accuracy of `actor` on dataset items (the rollout engine with their images, temperature 0) under
    the reward `score` (any form `RewardFunction` takes)."""
    from verl_mega.rewards.base import RewardFunction
    from verl_mega.trainer.batch import sample_images

    score = RewardFunction(score)
    pixel_values, grids = sample_images(items)
    images = [None if pv is None else (pv, g) for pv, g in zip(pixel_values, grids)]
    out = actor.generate([list(i["prompt_ids"]) for i in items], max_new_tokens=MAX_NEW_TOKENS, temperature=0.0,
                         images=images)
    return sum(float(score(o["response"], i)) for o, i in zip(out, items)) / len(items)


def supervise(actor, dataset, args, score) -> int:
    """SFT on the answers until greedy accuracy on 64 training prompts reaches args.sft_target (checked every
    args.sft_every steps) or args.sft_max_steps; returns the steps run."""
    from verl_mega.trainer.batch import ImageTokens
    from verl_mega.trainer.engine import TrainEngine, next_token_loss
    from verl_mega.trainer.optim import OptimConfig

    engine = TrainEngine(actor.model, actor.layout, OptimConfig(lr=args.sft_lr, weight_decay=0.0))
    loss_fn, image_tokens = next_token_loss(engine), ImageTokens.from_config(actor.config)
    gen = torch.Generator().manual_seed(args.seed * 1000 + actor.layout.dp_rank)
    probe = [dataset[i] for i in range(min(64, len(dataset)))]
    step = 0
    while step < args.sft_max_steps:
        items = [dataset[i] for i in torch.randint(len(dataset), (args.sft_batch,), generator=gen).tolist()]
        mb = sft_microbatch(items, [str(i["ground_truth"]) for i in items], actor.tokenizer, image_tokens)
        metrics = engine.forward_backward([mb], loss_fn)
        engine.optimizer_step()
        step += 1
        if step % args.sft_every == 0 or step == args.sft_max_steps:
            acc = accuracy(actor, probe, score)
            _say(f"[vision demo] SFT step {step}: loss {metrics['loss']:.3f}, training-probe accuracy {acc:.0%}")
            if acc >= args.sft_target:
                break
    return step


def rl_config(args, sft_dir: str, out: str):
    """The GRPO TrainerConfig of the demo (every value from args; the rest TrainerConfig's defaults)."""
    from verl_mega.trainer.config import TrainerConfig

    cfg = TrainerConfig()
    cfg.model.path = sft_dir
    cfg.data.train_path, cfg.data.val_path = os.path.join(out, "train.parquet"), os.path.join(out, "heldout.parquet")
    cfg.data.max_prompt_length = 256
    t = cfg.trainer
    t.output_dir, t.seed, t.save_final, t.resume = out, args.seed, False, False
    t.total_steps, t.rollout_batch_size, t.val_every = args.rl_steps, args.rollout_batch, args.val_every
    t.micro_batch_size = args.rollout_batch * args.n_samples
    t.progress_bar, t.tensorboard = False, False
    cfg.algorithm.name, cfg.algorithm.kl_coef = "grpo", 0.0
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay = args.rl_lr, 0, 0.0
    cfg.rollout.n_samples, cfg.rollout.max_new_tokens, cfg.rollout.temperature = args.n_samples, MAX_NEW_TOKENS, 1.0
    return cfg


def run(args) -> dict:
    """The vision demo on this rank (see the module docstring); returns the summary dict."""
    from verl_mega.apps import demo_vision_task as task
    from verl_mega.apps.demo import plot_runs
    from verl_mega.data import get_dataloader
    from verl_mega.data.dataset import RLDataset
    from verl_mega.parallel.layout import Layout
    from verl_mega.rollout.actor import get_actor_model
    from verl_mega.trainer.ppo_trainer import PPOTrainer
    from verl_mega.trainer.vision_data import image_processor_for

    torch.manual_seed(args.seed)
    start = time.time()
    layout = Layout.create(tp=args.tp or int(os.environ.get("WORLD_SIZE", 1)), pp=1)
    out = os.path.abspath(args.output_dir)
    base_dir, sft_dir = os.path.join(out, "model_init"), os.path.join(out, "model_sft")
    train_path, heldout_path = os.path.join(out, "train.parquet"), os.path.join(out, "heldout.parquet")
    reuse = args.reuse_sft and os.path.isfile(os.path.join(sft_dir, "config.json"))
    if layout.rank == 0:
        os.makedirs(out, exist_ok=True)
        train_rows, heldout_rows = task.make_vision_task(args.seed, num_train=args.train, num_heldout=args.heldout)
        task.write_parquet(train_rows, train_path)
        task.write_parquet(heldout_rows, heldout_path)
        if not reuse:
            make_model_dir(base_dir, args)
        metrics_path = os.path.join(out, "metrics.jsonl")
        if os.path.exists(metrics_path):
            os.remove(metrics_path)
    dist.barrier()
    actor = get_actor_model(sft_dir if reuse else base_dir, layout=layout)
    processor = image_processor_for(actor.path, actor.config)
    train_set = RLDataset(train_path, actor.tokenizer, image_processor=processor, max_prompt_length=256)
    _say(f"[vision demo] {len(train_set)} train / {args.heldout} held-out image questions, {layout}; "
         f"tiny Qwen2.5-VL in {base_dir}")
    sft_steps = 0
    if reuse:
        _say(f"[vision demo] --reuse-sft: RL starts from {sft_dir}")
    else:
        sft_steps = supervise(actor, train_set, args, task.compute_score)
        actor.save_hf(sft_dir)
        dist.barrier()
        _say(f"[vision demo] {sft_steps} SFT steps -> {sft_dir} ({time.time() - start:.0f} s)")
        del actor  # its SFT engine's hooks stay on the model: RL loads the saved model afresh
        actor = get_actor_model(sft_dir, layout=layout)
    sft_s = time.time() - start
    cfg = rl_config(args, sft_dir, out)
    trainer = PPOTrainer(actor, reward_fn=task.compute_score, config=cfg)
    loader = get_dataloader(train_set, actor.tokenizer, args.rollout_batch, seed=args.seed,
                            dp_rank=layout.dp_rank, dp_size=layout.dp)
    _say(f"[vision demo] GRPO: {args.rl_steps} steps of {args.rollout_batch} prompts x {args.n_samples} samples, "
         f"lr {args.rl_lr:g}")
    history = trainer.fit(loader)
    vals = trainer.val_history
    summary = {"accuracy_before": vals[0]["val/accuracy"], "accuracy_after": vals[-1]["val/accuracy"],
               "val_history": vals, "sft_steps": sft_steps, "rl_steps": len(history), "sft_seconds": sft_s,
               "seconds": time.time() - start, "layout": repr(layout),
               "rewards": [h["reward/mean"] for h in history]}
    if layout.rank == 0:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        plot_runs({"grpo (vision)": os.path.join(out, "metrics.jsonl")}, os.path.join(out, "reward_curve.png"))
    _say(f"[vision demo] held-out accuracy {summary['accuracy_before']:.1%} -> {summary['accuracy_after']:.1%} "
         f"({(summary['accuracy_after'] - summary['accuracy_before']) * 100:+.1f} points) in {len(history)} GRPO "
         f"steps; {summary['seconds']:.0f} s in all")
    return summary
