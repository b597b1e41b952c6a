"""`verl-mega train CONFIG.yaml [key=value ...]`: RL training from a YAML config plus dotted overrides.

    verl-mega train examples/configs/gsm8k_grpo.yaml model.path=/models/qwen2.5-0.5b trainer.total_steps=50
    torchrun --nproc-per-node 8 -m verl_mega train cfg.yaml parallel.tp=2 parallel.pp=2

The YAML and the overrides are checked against `TrainerConfig` (an unknown or mistyped key is an
error naming it). Every rank loads its stage of the actor (`parallel.tp` x `parallel.pp`, dp = the
rest of the world), reads its data-parallel share of `data.train_path`, and runs
`PPOTrainer.fit` for `trainer.total_steps` steps, writing metrics.jsonl, TensorBoard scalars and
checkpoints to `trainer.output_dir` (and resuming from the newest checkpoint there).

Reward (`trainer.reward`): "rule" scores GSM8K / MATH rows by `data_source`; "pkg.module:fn" or
"path/to/file.py:fn" imports a user function (`fn(response)` or verl's `compute_score(...)`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

from verl_mega.config import load_config, to_yaml
from verl_mega.trainer.config import TrainerConfig, check_config


def load_reward(spec: str):
    """The reward callable named by `spec` ("rule", "module:function" or "file.py:function")."""
    if spec == "rule":
        from verl_mega.rewards.base import RuleBasedReward

        return RuleBasedReward()
    if ":" not in spec:
        raise ValueError(f"trainer.reward={spec!r}: use 'rule', 'package.module:function' or 'file.py:function'")
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py"):
        if not os.path.isfile(target):
            raise ValueError(f"trainer.reward: file {target} does not exist")
        module_spec = importlib.util.spec_from_file_location("verl_mega_user_reward", target)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"trainer.reward: {target} has no callable {name!r}")
    return fn


def parse_config(argv: list[str]) -> TrainerConfig:
    """CONFIG.yaml + overrides -> a checked TrainerConfig (ValueError naming the bad key)."""
    parser = argparse.ArgumentParser(prog="verl-mega train", description="RL training from a YAML config")
    parser.add_argument("config", help="YAML file (see examples/configs/)")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. optim.lr=1e-6")
    parser.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    args = parser.parse_args(argv)
    cfg = load_config(TrainerConfig, args.config, args.overrides)
    check_config(cfg)
    if args.print_config:
        print(to_yaml(cfg))
        raise SystemExit(0)
    return cfg


def train(cfg: TrainerConfig) -> list[dict]:
    """Load the actor and data for `cfg` on this rank and run PPOTrainer.fit; returns the step metrics."""
    from verl_mega.data import get_dataloader
    from verl_mega.rollout.actor import get_actor_model
    from verl_mega.trainer.ppo_trainer import PPOTrainer

    actor = get_actor_model(cfg.model.path, torch_dtype=cfg.model.dtype, tensor_parallel_size=cfg.parallel.tp,
                            pipeline_parallel_size=cfg.parallel.pp)
    if actor.tokenizer is None:
        raise ValueError(f"model.path={cfg.model.path} has no tokenizer (tokenizer.json / tokenizer.model)")
    d = cfg.data
    loader = get_dataloader(d.train_path, actor.tokenizer, cfg.trainer.rollout_batch_size, shuffle=d.shuffle,
                            seed=cfg.trainer.seed, dp_rank=actor.layout.dp_rank, dp_size=actor.layout.dp,
                            prompt_key=d.prompt_key, max_prompt_length=d.max_prompt_length,
                            apply_chat_template=d.apply_chat_template)
    trainer = PPOTrainer(actor, reward_fn=load_reward(cfg.trainer.reward), config=cfg)
    return trainer.fit(loader, steps=cfg.trainer.total_steps)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_config(argv)
    except ValueError as exc:
        print(f"verl-mega train: {exc}", file=sys.stderr)
        return 2
    history = train(cfg)
    if history and int(os.environ.get("RANK", 0)) == 0:
        last = history[-1]
        print(f"done: {len(history)} steps, last reward_mean {last.get('reward_mean', float('nan')):.4f}; "
              f"metrics in {os.path.join(cfg.trainer.output_dir, 'metrics.jsonl')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
