"""`verl-mega train CONFIG.yaml [key=value ...]`: RL training from a YAML config plus dotted overrides.

    verl-mega train examples/configs/gsm8k_grpo.yaml model.path=/models/qwen2.5-0.5b trainer.total_steps=50
    verl-mega train cfg.yaml parallel.tp=2                   # starts tp x pp = 2 processes itself
    verl-mega train cfg.yaml parallel.tp=2 --nproc 4         # 4 processes: tp=2, dp=2
    torchrun --nproc-per-node 8 -m verl_mega train cfg.yaml parallel.tp=2 parallel.pp=2
    verl-mega train --print-config [CONFIG.yaml] [key=value ...]   # the resolved config; paths may be unset

The YAML and the overrides are checked against `TrainerConfig` (an unknown or mistyped key is an
error naming it; docs/config.md lists every field). Before any model weights are loaded,
`apps/preflight.py` checks the launch (world size vs tp x pp), the model directory, the data (every
row, naming file, row and `data.prompt_key`) and the reward (a "rule" reward needs a checker for
every data_source); a failed check prints one message (rank 0; see OTHER_RANKS_GRACE_S) and exits with
status 2 (torchrun itself then exits 1 after its failure summary). Without
torchrun and with tp x pp > 1 (or --nproc N), the processes are spawned here, as `verl-mega demo` does.

Every rank loads its stage of the actor (`parallel.tp` x `parallel.pp`, dp = the rest of the world),
reads its data-parallel share of `data.train_path`, and runs `PPOTrainer.fit` for
`trainer.total_steps` steps, writing metrics.jsonl, TensorBoard scalars and checkpoints to
`trainer.output_dir` (and resuming from the newest checkpoint there). A reward that fails on every
call for `trainer.reward_fail_steps` steps in a row stops the run with status 1. Ctrl-C (SIGINT) and SIGTERM
(`kill`, `timeout`, a scheduler's stop) end the run as one: spawned ranks are stopped with it, and the
message names the checkpoint a rerun resumes from (status 130 / 143).

Reward (`trainer.reward`): "rule" scores GSM8K / MATH rows by `data_source`; "pkg.module:fn" or
"path/to/file.py:fn" imports a user function (`fn(response)` or verl's `compute_score(...)`);
"model:PATH" loads a HF `*ForSequenceClassification` reward model on the actor's layout; "judge:PATH"
loads a causal-LM judge (`LLMJudgerReward`, tp = the actor's, one stage). `trainer.reward_offload`
keeps either in CPU memory between reward calls.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import threading
import time

from verl_mega.apps.preflight import Prepared, newest_actor_checkpoint, preflight
from verl_mega.config import load_config, merge_config
from verl_mega.trainer.config import TrainerConfig, check_config, model_reward

EXIT_BAD_INPUT = 2  # config, data, launch or model-directory error (nothing was trained)
EXIT_REWARD_FAILED = 1  # the reward failed too often while training
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, the shell's convention)
EXIT_TERMINATED = 143  # SIGTERM (128 + 15)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so that it unwinds as Ctrl-C does (spawned ranks killed)."""


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises `Terminated` in the main thread (once: the handler is restored first,
    so a second SIGTERM acts as before). Without it the default action ends this process at once, and ranks it
    spawned would go on training, orphaned. A no-op outside the main thread (signals cannot be set there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, previous)
        raise Terminated

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
# Under torchrun every rank finds the same error; rank 0 prints it and exits at once, and torchrun then stops
# the others. A rank != 0 waits this long before printing its own message (reached only when rank 0 did not
# fail the same way) so that a failing launch shows one message, not one per rank.
OTHER_RANKS_GRACE_S = 30.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="verl-mega train", description="RL training from a YAML config")
    p.add_argument("config", nargs="?", default=None, help="YAML file (see examples/configs/; docs/config.md)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. optim.lr=1e-6")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (YAML; unset required keys show as ???) and exit")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes to start when not under torchrun (default: parallel.tp x parallel.pp)")
    return p


def _split_args(argv: list[str]) -> argparse.Namespace:
    args = _parser().parse_intermixed_args(argv)
    if args.config is not None and "=" in args.config and not os.path.isfile(args.config):
        args.overrides.insert(0, args.config)  # `train --print-config a.b=1`: no YAML given
        args.config = None
    return args


def judge_options(t) -> dict:
    """`LLMJudgerReward` keywords from the trainer section's judge_* keys that are set (the rest: its defaults)."""
    keys = (("prompt_template", t.judge_template), ("parse", t.judge_parse), ("max_new_tokens", t.judge_max_new_tokens))
    return {key: value for key, value in keys if value is not None}


def load_model_reward(t, actor):
    """The model reward named by the trainer section `t` (`t.reward`: "model:PATH": a HF
    *ForSequenceClassification reward model on the actor's layout and dtype; "judge:PATH": an `LLMJudgerReward`
    at the actor's tp with `judge_options(t)`; `t.reward_offload`). Collective."""
    from verl_mega.model_rewards import LLMJudgerReward, RewardModel

    kind, path = model_reward(t.reward)
    if kind == "model":
        return RewardModel(path, torch_dtype=actor.dtype, layout=actor.layout, offload=t.reward_offload)
    return LLMJudgerReward(path, torch_dtype=actor.dtype, tensor_parallel_size=actor.layout.tp,
                           offload=t.reward_offload, **judge_options(t))


def parse_config(argv: list[str]) -> TrainerConfig:
    """CONFIG.yaml + overrides -> a checked TrainerConfig (ValueError naming the bad key).
    With --print-config, prints the resolved config (required paths may be unset) and exits 0."""
    args = _split_args(argv)
    if args.print_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(merge_config(TrainerConfig, args.config, args.overrides)), end="")
        raise SystemExit(0)
    if args.config is None:
        raise ValueError("give a CONFIG.yaml (e.g. examples/configs/gsm8k_grpo.yaml) before the key=value overrides")
    cfg = load_config(TrainerConfig, args.config, args.overrides)
    check_config(cfg)
    return cfg


def train(cfg: TrainerConfig, prepared: Prepared | None = None) -> list[dict]:
    """Load the actor for `cfg` on this rank and run PPOTrainer.fit; returns the step metrics.
    `prepared` is the preflight result (computed here when None)."""
    from verl_mega.data import get_dataloader
    from verl_mega.rollout.actor import get_actor_model
    from verl_mega.trainer.ppo_trainer import PPOTrainer

    if prepared is None:
        prepared = preflight(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    actor = get_actor_model(cfg.model.path, torch_dtype=cfg.model.dtype, tensor_parallel_size=cfg.parallel.tp,
                            pipeline_parallel_size=cfg.parallel.pp)
    loader = get_dataloader(prepared.dataset, actor.tokenizer, cfg.trainer.rollout_batch_size, shuffle=cfg.data.shuffle,
                            seed=cfg.trainer.seed, dp_rank=actor.layout.dp_rank, dp_size=actor.layout.dp)
    reward = prepared.reward_fn
    if reward is None:  # a model reward: loaded now, on the actor's layout
        reward = load_model_reward(cfg.trainer, actor)
    val_loader = None
    if prepared.val_dataset is not None:
        val_loader = get_dataloader(prepared.val_dataset, actor.tokenizer, cfg.trainer.val_batch_size, shuffle=False,
                                    drop_last=False, dp_rank=actor.layout.dp_rank, dp_size=actor.layout.dp)
    trainer = PPOTrainer(actor, reward_fn=reward, config=cfg)
    return trainer.fit(loader, steps=cfg.trainer.total_steps, val_dataloader=val_loader)


def _spawned_rank(cfg: TrainerConfig) -> dict:
    """One spawned rank: train, and hand back rank 0's history or an expected error's message."""
    from verl_mega.rewards.base import RewardFailureError

    try:
        history = train(cfg)
    except ValueError as exc:
        return {"error": str(exc), "status": EXIT_BAD_INPUT}
    except RewardFailureError as exc:
        return {"error": str(exc), "status": EXIT_REWARD_FAILED}
    return {"history": history if int(os.environ["RANK"]) == 0 else None}


def _run_spawned(cfg: TrainerConfig, nproc: int) -> tuple[list[dict], str | None, int]:
    """Train on `nproc` spawned local processes; (rank 0's history, an error message or None, status)."""
    from verl_mega.parallel.dist import default_timeout_s
    from verl_mega.testing.multiprocess import run_distributed

    print(f"[verl-mega] starting {nproc} processes (parallel.tp={cfg.parallel.tp} x parallel.pp={cfg.parallel.pp}, "
          f"dp={nproc // (cfg.parallel.tp * cfg.parallel.pp)})", flush=True)
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "VERL_MEGA_DIST_TIMEOUT": str(default_timeout_s())}
    # collectives time out after VERL_MEGA_DIST_TIMEOUT, so a dead rank ends the run; no wall-clock limit on training
    results = run_distributed(_spawned_rank, nproc, cfg, timeout_s=math.inf, env=env)
    for res in results:
        if "error" in res:
            return [], res["error"], res["status"]
    return results[0]["history"], None, 0


def done_line(cfg: TrainerConfig, history: list[dict]) -> str:
    """The closing line: steps, last reward, where metrics and checkpoints are, and the export command."""
    from verl_mega.trainer import checkpointing

    out = os.path.abspath(cfg.trainer.output_dir)
    last = history[-1]
    steps = f"{len(history)} step{'' if len(history) == 1 else 's'}"
    line = (f"done: {steps}, last reward/mean {last.get('reward/mean', float('nan')):.3g}; "
            f"metrics in {os.path.join(out, 'metrics.jsonl')}")
    ckpt = os.path.join(out, "checkpoints")
    if checkpointing.latest_checkpoint(ckpt):
        line += f"; checkpoints in {ckpt}; export one with: verl-mega export {out} HF_OUT_DIR"
    else:
        line += "; no checkpoint saved (trainer.save_final=false, trainer.save_every=0)"
    return line


def interrupted_line(cfg: TrainerConfig, what: str = "interrupted") -> str:
    """What a Ctrl-C (or SIGTERM: `what`) leaves: the checkpoint a rerun of the same command resumes from, or
    that there is none."""
    path = newest_actor_checkpoint(cfg)
    if path is not None and cfg.trainer.resume:
        return f"verl-mega train: {what}; rerun the same command to resume from the newest checkpoint, {path}"
    why = "" if path is None else " (trainer.resume=false)"
    return (f"verl-mega train: {what} with no checkpoint to resume from{why}; "
            f"a rerun starts at step 0 (trainer.save_every=N saves one every N steps)")


def _report(exc: BaseException, status: int) -> int:
    """Print `exc` as the one error line of the run (rank 0 now, other ranks after a grace period); returns status."""
    rank = int(os.environ.get("RANK", 0))
    if rank != 0:
        time.sleep(OTHER_RANKS_GRACE_S)
    print(f"verl-mega train: error: {exc}" if rank == 0 else f"verl-mega train: error (rank {rank}): {exc}",
          file=sys.stderr, flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    """Entry point of `verl-mega train`; returns the exit status (0 ok, 1 reward failures, 2 bad input, 130 Ctrl-C,
    143 SIGTERM)."""
    from verl_mega.rewards.base import RewardFailureError

    argv = list(sys.argv[1:] if argv is None else argv)
    under_torchrun = "RANK" in os.environ
    try:
        cfg = parse_config(argv)
        nproc = _split_args(argv).nproc
        if nproc is not None and (under_torchrun or nproc < 1):
            raise ValueError(f"--nproc {nproc}: only for starting >= 1 processes without torchrun (torchrun sets "
                             f"the process count with --nproc-per-node)")
        spawn = not under_torchrun and (nproc or cfg.parallel.tp * cfg.parallel.pp) > 1
        world = (nproc or cfg.parallel.tp * cfg.parallel.pp) if spawn else int(os.environ.get("WORLD_SIZE", 1))
        prepared = preflight(cfg, world)
    except ValueError as exc:
        return _report(exc, EXIT_BAD_INPUT)
    try:
        with sigterm_as_interrupt():
            if spawn:
                history, error, status = _run_spawned(cfg, world)
                if error is not None:
                    print(f"verl-mega train: error: {error}", file=sys.stderr)
                    return status
            else:
                try:
                    history = train(cfg, prepared)
                except ValueError as exc:
                    return _report(exc, EXIT_BAD_INPUT)
                except RewardFailureError as exc:
                    return _report(exc, EXIT_REWARD_FAILED)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: where the run can resume from, not a traceback
        if int(os.environ.get("RANK", 0)) == 0:
            print(interrupted_line(cfg, "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"),
                  file=sys.stderr, flush=True)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    if history and int(os.environ.get("RANK", 0)) == 0:
        print(done_line(cfg, history), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
