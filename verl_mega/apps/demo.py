"""`verl-mega demo`: the whole pipeline on CPU in a few minutes — supervise a tiny model on two-digit
addition, then GRPO with an exact-match reward, and show held-out accuracy before and after RL.

    verl-mega demo                 # 2 processes, tensor parallel 2 (spawned here; no torchrun needed)
    verl-mega demo --quick         # CI smoke run (< 90 s)
    torchrun --nproc-per-node 2 -m verl_mega demo   # the same under torchrun

Steps (every rank runs them; rank 0 writes files and prints):
 1. make the task (train / held-out pairs), train a sentencepiece tokenizer on it, write a random
    tiny Llama as a Hugging Face directory (demo_task.py);
 2. load it with `get_actor_model` (tp from --tp), supervise it with `TrainEngine` (next-token loss on
    the answer) until greedy accuracy on a probe of TRAINING prompts reaches --sft-target (a modest
    start, so RL has room to improve), save it with `actor.save_hf` and reload it;
 3. greedy held-out accuracy; GRPO with `PPOTrainer.fit` (n samples per prompt, temperature 1,
    exact-match reward, live tqdm bar, metrics.jsonl + TensorBoard in --output-dir); accuracy again;
 4. write reward_curve.png (reward per step, accuracy before/after) and summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

DEFAULTS = dict(sft_target=0.3, sft_max_steps=600, sft_lr=1e-3, sft_batch=64, rl_steps=80, rl_lr=1e-4,
                rollout_batch=64, n_samples=8, heldout=200)
QUICK = dict(sft_target=1.0, sft_max_steps=25, rl_steps=3, rollout_batch=8, n_samples=4, heldout=40)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="verl-mega demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run for CI (< 90 s)")
    p.add_argument("--nproc", type=int, default=2, help="processes to spawn when not under torchrun (default 2)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: the number of processes)")
    p.add_argument("--output-dir", default="demo_output", help="where data, models, metrics and the plot go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft-target", type=float, help="stop SFT at this greedy accuracy on training prompts")
    p.add_argument("--sft-max-steps", type=int, help="SFT step limit")
    p.add_argument("--sft-lr", type=float)
    p.add_argument("--sft-batch", type=int)
    p.add_argument("--rl-steps", "--steps", dest="rl_steps", type=int, help="GRPO steps")
    p.add_argument("--rl-lr", type=float)
    p.add_argument("--rollout-batch", type=int, help="prompts per GRPO step")
    p.add_argument("--n-samples", type=int, help="responses per prompt")
    p.add_argument("--heldout", type=int, help="held-out prompts")
    args = p.parse_args(argv)
    preset = {**DEFAULTS, **(QUICK if args.quick else {})}
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ or args.nproc == 1:
        run(args)
        return 0
    from verl_mega.testing.multiprocess import run_distributed

    start = time.time()
    run_distributed(run, args.nproc, args, timeout_s=3600.0, env={"OMP_NUM_THREADS": "1", "VERL_MEGA_DIST_TIMEOUT": "600"})
    print(f"demo finished in {time.time() - start:.0f} s (outputs in {os.path.abspath(args.output_dir)})")
    return 0


def _say(*msg) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*msg, flush=True)


def run(args: argparse.Namespace) -> dict:
    """The demo on this rank (see module docstring); returns the summary dict."""
    from verl_mega.data import get_dataloader
    from verl_mega.rollout.actor import get_actor_model
    from verl_mega.parallel.layout import Layout
    from verl_mega.apps import demo_task as task
    from verl_mega.trainer.ppo_trainer import PPOTrainer

    torch.manual_seed(args.seed)
    start = time.time()
    world = int(os.environ.get("WORLD_SIZE", 1))
    layout = Layout.create(tp=args.tp or world, pp=1)
    out = os.path.abspath(args.output_dir)
    base_dir, sft_dir = os.path.join(out, "model_init"), os.path.join(out, "model_sft")
    train_rows, heldout_rows = task.make_arithmetic_task(args.seed, num_heldout=args.heldout)
    if layout.rank == 0:
        os.makedirs(out, exist_ok=True)
        for name in ("metrics.jsonl",):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        task.write_jsonl(train_rows, os.path.join(out, "train.jsonl"))
        task.write_jsonl(heldout_rows, os.path.join(out, "heldout.jsonl"))
        tok = task.train_char_tokenizer(train_rows + heldout_rows, os.path.join(out, "arith.model"))
        task.make_model_dir(base_dir, tok, seed=args.seed)
    dist.barrier()
    _say(f"[demo] {len(train_rows)} train / {len(heldout_rows)} held-out addition problems, "
         f"{layout}; tiny Llama in {base_dir}")

    actor = get_actor_model(base_dir, layout=layout)
    sft_steps = supervise(actor, train_rows, args)
    actor.save_hf(sft_dir)
    dist.barrier()
    actor = get_actor_model(sft_dir, layout=layout)  # RL starts from the saved HF directory
    before = accuracy(actor, heldout_rows)
    _say(f"[demo] after {sft_steps} SFT steps: held-out accuracy {before:.1%} ({time.time() - start:.0f} s)")

    trainer = PPOTrainer(actor, reward_fn=task.exact_match, config=rl_config(args, out))
    loader = get_dataloader(os.path.join(out, "train.jsonl"), actor.tokenizer, args.rollout_batch, seed=args.seed,
                            apply_chat_template=False, max_prompt_length=16,
                            dp_rank=layout.dp_rank, dp_size=layout.dp)
    history = trainer.fit(loader, steps=args.rl_steps)
    after = accuracy(actor, heldout_rows)
    summary = {"heldout_accuracy_before_rl": before, "heldout_accuracy_after_rl": after, "sft_steps": sft_steps,
               "rl_steps": len(history), "seconds": time.time() - start, "layout": repr(layout)}
    _say(f"[demo] GRPO {len(history)} steps: held-out accuracy {before:.1%} -> {after:.1%} "
         f"({(after - before) * 100:+.1f} points), {summary['seconds']:.0f} s")
    if layout.rank == 0:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        plot_rewards(os.path.join(out, "metrics.jsonl"), os.path.join(out, "reward_curve.png"), before, after)
        _say(f"[demo] wrote {os.path.join(out, 'reward_curve.png')} and metrics.jsonl")
    return summary


def rl_config(args, out: str):
    """GRPO settings of the demo (a TrainerConfig)."""
    from verl_mega.trainer.config import TrainerConfig

    cfg = TrainerConfig()
    cfg.model.path = "(given)"
    cfg.data.train_path = os.path.join(out, "train.jsonl")
    cfg.data.max_prompt_length = 16
    cfg.rollout.n_samples, cfg.rollout.max_new_tokens, cfg.rollout.temperature = args.n_samples, 4, 1.0
    cfg.algorithm.name = "grpo"
    cfg.optim.lr, cfg.optim.weight_decay = args.rl_lr, 0.0
    t = cfg.trainer
    t.rollout_batch_size, t.micro_batch_size, t.num_epochs = args.rollout_batch, 512, 1
    t.seed, t.output_dir, t.total_steps, t.save_final, t.resume = args.seed, out, args.rl_steps, False, False
    return cfg


def supervise(actor, rows: list[dict], args) -> int:
    """Next-token SFT on the answers until greedy accuracy on 100 training prompts reaches args.sft_target
    (checked every 25 steps) or args.sft_max_steps; returns the number of steps."""
    from verl_mega.apps import demo_task as task
    from verl_mega.trainer.engine import TrainEngine, causal_lm_microbatches, next_token_loss
    from verl_mega.trainer.optim import OptimConfig

    layout = actor.layout
    engine = TrainEngine(actor.model, layout, OptimConfig(lr=args.sft_lr, weight_decay=0.0))
    loss_fn = next_token_loss(engine)
    gen = torch.Generator().manual_seed(args.seed * 1000 + layout.dp_rank)
    probe = rows[:100]
    step = 0
    while step < args.sft_max_steps:
        idx = torch.randint(len(rows), (args.sft_batch,), generator=gen).tolist()
        ids, mask, loss_mask = task.sft_tensors([rows[i] for i in idx], actor.tokenizer)
        (mb,) = causal_lm_microbatches(ids, mask)
        mb["loss_mask"] = loss_mask
        metrics = engine.forward_backward([mb], loss_fn)
        engine.optimizer_step()
        step += 1
        if step % 25 == 0 or step == args.sft_max_steps:
            acc = accuracy(actor, probe)
            _say(f"[demo] SFT step {step}: loss {metrics['loss']:.3f}, training-probe accuracy {acc:.0%}")
            if acc >= args.sft_target:
                break
    return step


@torch.no_grad()
def accuracy(actor, rows: list[dict]) -> float:
    """Greedy exact-match accuracy of `actor` on `rows` (the rollout engine, temperature 0)."""
    from verl_mega.apps import demo_task as task

    prompts = [actor.tokenizer.encode(r["prompt"], add_special_tokens=True) for r in rows]
    results = actor.generate(prompts, max_new_tokens=4, temperature=0.0)
    return sum(task.exact_match(res["response"], task.answer(r)) for res, r in zip(results, rows)) / len(rows)


def plot_rewards(metrics_path: str, png_path: str, before: float, after: float) -> None:
    """Reward mean per GRPO step (and its 10-step moving average) with the held-out accuracy before/after."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from verl_mega.trainer.metrics import read_metrics

    records = read_metrics(metrics_path)
    steps = [r["step"] for r in records]
    rewards = [r["reward_mean"] for r in records]
    smooth = [sum(rewards[max(0, i - 9):i + 1]) / len(rewards[max(0, i - 9):i + 1]) for i in range(len(rewards))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, rewards, alpha=0.35, label="reward (train samples, T=1)")
    ax.plot(steps, smooth, label="reward, 10-step mean")
    if steps:
        ax.scatter([0, steps[-1]], [before, after], color="k", zorder=3, label="held-out greedy accuracy")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("exact-match reward / accuracy")
    ax.set_title(f"verl-mega demo: held-out accuracy {before:.0%} -> {after:.0%}")
    ax.legend(loc="upper center")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
