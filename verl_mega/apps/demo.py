"""`verl-mega demo`: the whole pipeline on CPU in a few minutes — supervise a tiny model on two-digit
addition, then RL (GRPO, PPO, RLOO, REINFORCE++ or REINFORCE++-baseline) with an exact-match reward, and
show the held-out greedy accuracy before, during and after RL.

    verl-mega demo                          # GRPO; 2 processes, tensor parallel 2 (spawned; no torchrun needed)
    verl-mega demo --algorithm ppo          # PPO with a critic (GAE), from the same SFT start
    verl-mega demo --algorithm all          # the five estimators one after the other, one plot
    verl-mega demo --quick                  # CI smoke run
    verl-mega demo --task tool              # learn to call the Python tool (three-digit products; demo_tool_task.py)
    verl-mega demo --task vision            # a tiny VLM counts squares in drawn images (demo_vision.py)
    verl-mega demo --plot runs/grpo runs/ppo --output-dir runs   # one plot over several runs' metrics.jsonl
    torchrun --nproc-per-node 2 -m verl_mega demo   # the same under torchrun

Steps (every rank runs them; rank 0 writes files and prints):
 1. make the task (train / held-out pairs), train a sentencepiece tokenizer on it, write a random
    tiny Llama as a Hugging Face directory (demo_task.py) -> model_init/;
 2. load it with `get_actor_model` (tp from --tp), supervise it with `TrainEngine` (next-token loss on
    the answer) until greedy accuracy on a probe of TRAINING prompts reaches --sft-target (a modest
    start, so RL has room to improve), save it with `actor.save_hf` -> model_sft/ (`--reuse-sft` keeps
    an existing one, so several algorithms start from the same model);
 3. per algorithm, its recipe examples/configs/demo_<algorithm>.yaml (the file a user copies for
    `verl-mega train`) with this run's paths: `PPOTrainer.fit` from model_sft/, validating greedily on
    the held-out prompts before RL, every trainer.val_every steps and at the end (the validation
    hook), then the RL model saved -> model_rl/ (with several algorithms: <algorithm>/model_rl/);
 4. write reward_curve.png (training reward and held-out accuracy per step, one curve per algorithm)
    and summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

ALGORITHMS = ("grpo", "ppo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline")
RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "examples", "configs")
DEFAULTS = dict(sft_target=0.3, sft_max_steps=600, sft_lr=1e-3, sft_batch=64, heldout=200,
                rl_steps=None, rl_lr=None, rollout_batch=None, n_samples=None, val_every=None)  # None: the recipe's
QUICK = dict(sft_target=1.0, sft_max_steps=25, rl_steps=3, rollout_batch=8, n_samples=4, heldout=40, val_every=0)
DEMO_KV_HEADS = 2  # key-value heads of every demo model (arithmetic, tool, vision): the tensor-parallel size divides them
# the step-metric keys the demo reads (renamed in one place if the Metrics stage renames them)
KEYS = dict(reward="reward/mean", val_accuracy="val/accuracy", explained_variance="critic/explained_variance")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="verl-mega demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run for CI")
    p.add_argument("--task", choices=("arithmetic", "tool", "vision"), default="arithmetic",
                   help="arithmetic: two-digit addition (default); tool: learn to call the Python tool for "
                        "three-digit multiplication (apps/demo_tool_task.py); vision: a tiny Qwen2.5-VL-style "
                        "model answers questions about synthetic images (apps/demo_vision.py)")
    p.add_argument("--tool-fraction", type=float, help="--task tool: fraction of SFT examples that call the tool")
    p.add_argument("--algorithm", default="grpo",
                   help=f"RL algorithm: one of {', '.join(ALGORITHMS)}, a comma-separated list, or 'all' (default grpo)")
    p.add_argument("--recipe", help="RL config YAML (default: examples/configs/demo_<algorithm>.yaml; one algorithm only)")
    p.add_argument("--nproc", type=int, default=2, help="processes to spawn when not under torchrun (default 2)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: the number of processes)")
    p.add_argument("--output-dir", default="demo_output", help="where data, models, metrics and the plot go")
    p.add_argument("--reuse-sft", action="store_true", help="start RL from OUTPUT_DIR/model_sft if it exists (skip SFT)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft-target", type=float, help="stop SFT at this greedy accuracy on training prompts")
    p.add_argument("--sft-max-steps", type=int, help="SFT step limit")
    p.add_argument("--sft-lr", type=float)
    p.add_argument("--sft-batch", type=int)
    p.add_argument("--rl-steps", "--steps", dest="rl_steps", type=int, help="RL steps (default: the recipe's)")
    p.add_argument("--rl-lr", type=float, help="actor learning rate (default: the recipe's)")
    p.add_argument("--rollout-batch", type=int, help="prompts per RL step (default: the recipe's)")
    p.add_argument("--n-samples", type=int, help="responses per prompt (default: the recipe's)")
    p.add_argument("--val-every", type=int, help="held-out validation every N RL steps (default: the recipe's)")
    p.add_argument("--heldout", type=int, help="held-out prompts")
    p.add_argument("--plot", nargs="+", metavar="RUN_DIR",
                   help="only plot: one curve per RUN_DIR (a demo output or a `verl-mega train` output_dir with "
                        "metrics.jsonl) into OUTPUT_DIR/reward_curve.png")
    args = p.parse_args(argv)
    if not args.plot:
        _check_launch(p, args)
    if args.task in ("tool", "vision"):
        from verl_mega.apps import demo_tool_task, demo_vision

        module = demo_tool_task if args.task == "tool" else demo_vision
        args.sft_steps = args.sft_max_steps
        preset = {**module.DEFAULTS, **(module.QUICK if args.quick else {})}
        for key, value in preset.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
        return args
    preset = {**DEFAULTS, **(QUICK if args.quick else {})}
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.algorithms = list(ALGORITHMS) if args.algorithm == "all" else args.algorithm.split(",")
    bad = [a for a in args.algorithms if a not in ALGORITHMS]
    if bad:
        p.error(f"--algorithm: {bad} not in {ALGORITHMS} (or 'all')")
    if args.recipe and len(args.algorithms) > 1:
        p.error("--recipe applies to one algorithm; run the algorithms separately")
    if not args.plot:
        from verl_mega.trainer.config import check_config

        for algo in args.algorithms:  # the recipe with this command's overrides, checked before any process starts
            try:
                check_config(rl_config(algo, args, os.path.join("OUT", "model_sft"), "OUT"))
            except ValueError as exc:
                p.error(f"{algo} recipe with this command's options: {exc}")
    return args


def _check_launch(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """p.error (exit 2, naming the flag) for a process count or tensor-parallel size the demo cannot run, or no RL."""
    if args.nproc < 1:
        p.error(f"--nproc must be >= 1, got {args.nproc}")
    world = int(os.environ.get("WORLD_SIZE", 1)) if "RANK" in os.environ else args.nproc
    tp = args.tp or world
    if tp < 1 or DEMO_KV_HEADS % tp:
        p.error(f"tensor-parallel size {tp} (--tp; default: the process count): the demo models have "
                f"{DEMO_KV_HEADS} key-value heads, so use --tp 1 or --tp 2")
    if world % tp:
        p.error(f"--tp {tp} must divide the process count {world} (--nproc, or torchrun's world size)")
    if args.rl_steps is not None and args.rl_steps < 1:
        p.error(f"--rl-steps must be >= 1, got {args.rl_steps}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.plot:
        runs = {os.path.basename(os.path.normpath(d)): os.path.join(d, "metrics.jsonl") for d in args.plot}
        missing = [path for path in runs.values() if not os.path.isfile(path)]
        if missing:
            print(f"verl-mega demo --plot: no metrics.jsonl at {missing}", file=sys.stderr)
            return 2
        os.makedirs(args.output_dir, exist_ok=True)
        plot_runs(runs, os.path.join(args.output_dir, "reward_curve.png"))
        print(f"wrote {os.path.join(args.output_dir, 'reward_curve.png')}")
        return 0
    fn = run
    if args.task == "tool":
        from verl_mega.apps.demo_tool_task import run as fn
    elif args.task == "vision":
        from verl_mega.apps.demo_vision import run as fn
    if "RANK" in os.environ or args.nproc == 1:
        fn(args)
        return 0
    from verl_mega.testing.multiprocess import run_distributed

    start = time.time()
    run_distributed(fn, args.nproc, args, timeout_s=3600.0, env={"OMP_NUM_THREADS": "1", "VERL_MEGA_DIST_TIMEOUT": "600"})
    print(f"demo finished in {time.time() - start:.0f} s (outputs in {os.path.abspath(args.output_dir)})")
    return 0


def _say(*msg) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*msg, flush=True)


def run(args: argparse.Namespace) -> dict:
    """The demo on this rank (see module docstring); returns the summary dict."""
    from verl_mega.rollout.actor import get_actor_model
    from verl_mega.parallel.layout import Layout
    from verl_mega.apps import demo_task as task

    torch.manual_seed(args.seed)
    start = time.time()
    world = int(os.environ.get("WORLD_SIZE", 1))
    layout = Layout.create(tp=args.tp or world, pp=1)
    out = os.path.abspath(args.output_dir)
    base_dir, sft_dir = os.path.join(out, "model_init"), os.path.join(out, "model_sft")
    train_rows, heldout_rows = task.make_arithmetic_task(args.seed, num_heldout=args.heldout)
    reuse = args.reuse_sft and os.path.isfile(os.path.join(sft_dir, "config.json"))
    if layout.rank == 0:
        os.makedirs(out, exist_ok=True)
        task.write_jsonl(train_rows, os.path.join(out, "train.jsonl"))
        task.write_jsonl(heldout_rows, os.path.join(out, "heldout.jsonl"))
        if not reuse:
            tok = task.train_char_tokenizer(train_rows + heldout_rows, os.path.join(out, "arith.model"))
            task.make_model_dir(base_dir, tok, seed=args.seed)
    dist.barrier()
    _say(f"[demo] {len(train_rows)} train / {len(heldout_rows)} held-out addition problems, "
         f"{layout}; tiny Llama in {base_dir}")
    sft_steps = 0
    if reuse:
        _say(f"[demo] --reuse-sft: RL starts from {sft_dir}")
    else:
        actor = get_actor_model(base_dir, layout=layout)
        sft_steps = supervise(actor, train_rows, args)
        actor.save_hf(sft_dir)
        dist.barrier()
        _say(f"[demo] {sft_steps} SFT steps -> {sft_dir} ({time.time() - start:.0f} s)")

    runs = {}
    for algo in args.algorithms:
        run_dir = out if len(args.algorithms) == 1 else os.path.join(out, algo)
        runs[algo] = train_rl(algo, args, sft_dir, run_dir, layout)
    summary = {"algorithms": runs, "sft_steps": sft_steps, "seconds": time.time() - start, "layout": repr(layout)}
    if len(runs) == 1:
        (only,) = runs.values()
        summary.update(heldout_accuracy_before_rl=only["accuracy_before"], heldout_accuracy_after_rl=only["accuracy_after"],
                       rl_steps=only["rl_steps"])
    if layout.rank == 0:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        plot_runs({a: r["metrics"] for a, r in runs.items()}, os.path.join(out, "reward_curve.png"))
        _say(f"[demo] wrote {os.path.join(out, 'reward_curve.png')} and summary.json")
        for algo, r in runs.items():
            _say(f"[demo] {algo:<29} held-out accuracy {r['accuracy_before']:.1%} -> {r['accuracy_after']:.1%} "
                 f"in {r['rl_steps']} steps, {r['seconds']:.0f} s; model in {r['model_rl']}")
    return summary


def rl_config(algo: str, args, sft_dir: str, run_dir: str):
    """The RL TrainerConfig of `algo`: its recipe (examples/configs/demo_<algo>.yaml, or --recipe) with this run's
    paths, seed and the command-line overrides (steps, lr, batch, samples, validation period)."""
    from verl_mega.config import load_config
    from verl_mega.trainer.config import TrainerConfig

    recipe = args.recipe or os.path.join(RECIPES, f"demo_{algo}.yaml")
    if not os.path.isfile(recipe):
        raise ValueError(f"no recipe for {algo}: {recipe} does not exist (pass --recipe PATH)")
    out = os.path.dirname(sft_dir)
    overrides = [f"model.path={sft_dir}", f"data.train_path={os.path.join(out, 'train.jsonl')}",
                 f"data.val_path={os.path.join(out, 'heldout.jsonl')}", f"trainer.output_dir={run_dir}",
                 f"trainer.seed={args.seed}", "trainer.save_final=false", "trainer.resume=false",
                 f"algorithm.name={algo}"]
    for key, value in (("trainer.total_steps", args.rl_steps), ("optim.lr", args.rl_lr),
                       ("trainer.rollout_batch_size", args.rollout_batch), ("rollout.n_samples", args.n_samples),
                       ("trainer.val_every", args.val_every)):
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(TrainerConfig, recipe, overrides)


def train_rl(algo: str, args, sft_dir: str, run_dir: str, layout) -> dict:
    """RL with `algo` from `sft_dir`, validated on the held-out prompts; saves run_dir/model_rl. Returns its summary."""
    from verl_mega.apps.preflight import load_reward
    from verl_mega.data import get_dataloader
    from verl_mega.rollout import get_actor_model
    from verl_mega.trainer.ppo_trainer import PPOTrainer

    start = time.time()
    cfg = rl_config(algo, args, sft_dir, run_dir)
    if layout.rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        metrics_path = os.path.join(run_dir, "metrics.jsonl")
        if os.path.exists(metrics_path):
            os.remove(metrics_path)
    dist.barrier()
    torch.manual_seed(args.seed)
    actor = get_actor_model(sft_dir, layout=layout)  # every algorithm starts from the saved SFT model
    trainer = PPOTrainer(actor, reward_fn=load_reward(cfg.trainer.reward), config=cfg)
    d = cfg.data
    loader = get_dataloader(d.train_path, actor.tokenizer, cfg.trainer.rollout_batch_size, seed=args.seed,
                            apply_chat_template=d.apply_chat_template, max_prompt_length=d.max_prompt_length,
                            dp_rank=layout.dp_rank, dp_size=layout.dp)
    _say(f"[demo] {algo}: {cfg.trainer.total_steps} steps of {cfg.trainer.rollout_batch_size} prompts x "
         f"{cfg.rollout.n_samples} samples, lr {cfg.optim.lr:g}")
    history = trainer.fit(loader)
    rl_dir = os.path.join(run_dir, "model_rl")
    actor.save_hf(rl_dir)
    dist.barrier()
    vals = trainer.val_history
    evs = [h[KEYS["explained_variance"]] for h in history if KEYS["explained_variance"] in h]
    result = {"accuracy_before": vals[0][KEYS["val_accuracy"]], "accuracy_after": vals[-1][KEYS["val_accuracy"]],
              "rl_steps": len(history), "seconds": time.time() - start, "model_rl": rl_dir,
              "metrics": os.path.join(run_dir, "metrics.jsonl"),
              "config": {k: v for k, v in (("lr", cfg.optim.lr), ("rollout_batch_size", cfg.trainer.rollout_batch_size),
                                            ("n_samples", cfg.rollout.n_samples))}}
    if evs:
        result["explained_variance_max"] = max(e for e in evs if e == e)
        result["explained_variance_last"] = evs[-1]
    _say(f"[demo] {algo}: held-out accuracy {result['accuracy_before']:.1%} -> {result['accuracy_after']:.1%} "
         f"({(result['accuracy_after'] - result['accuracy_before']) * 100:+.1f} points), {result['seconds']:.0f} s; "
         f"RL model saved to {rl_dir}")
    return result


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


def plot_runs(runs: dict[str, str], png_path: str) -> None:
    """Two panels from each algorithm's metrics.jsonl (`runs`: name -> path): training reward per step (10-step
    moving mean) and held-out greedy accuracy at each validation (step 0 = the SFT start)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from verl_mega.trainer.metrics import read_metrics

    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(11, 4))
    for name, path in runs.items():
        records = read_metrics(path)
        train = [r for r in records if r.get(KEYS["reward"]) is not None]
        rewards = [r[KEYS["reward"]] for r in train]
        smooth = [sum(rewards[max(0, i - 9):i + 1]) / len(rewards[max(0, i - 9):i + 1]) for i in range(len(rewards))]
        line, = ax_r.plot([r["step"] for r in train], smooth, label=name)
        val = [r for r in records if r.get(KEYS["val_accuracy"]) is not None]
        ax_a.plot([r["step"] for r in val], [r[KEYS["val_accuracy"]] for r in val], marker="o", ms=3,
                  color=line.get_color(), label=name)
    ax_r.set(xlabel="RL step", ylabel="exact-match reward", title="training reward (samples at T=1, 10-step mean)")
    ax_a.set(xlabel="RL step", ylabel="accuracy", title="held-out greedy accuracy (validation)")
    for ax in (ax_r, ax_a):
        ax.legend(loc="lower right")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
