"""Trainer checkpoints on top of the engine's DCP checkpoints (`verl_mega/trainer/checkpoint.py`).

Directory layout under a root (default `<output_dir>/checkpoints`):

    actor/step_N/    actor engine (weights, AdamW moments, step, RNG) + the trainer's state
    critic/step_N/   critic engine (PPO only)

The trainer's own state rides in the actor checkpoint's client state: the global RL step, the KL
coefficient (adaptive controllers move it) and the dataloader position, so a resumed run draws the
same next batch, samples with the same seeds and produces the same next step. The reference policy
is not saved: it is a frozen copy of the initial actor, rebuilt by the trainer before loading.
Both engines save atomically (`step_N.tmp` -> `step_N` after a COMPLETE marker); loading takes the
newest complete actor step and the critic of the same step. Any layout can load any other's
checkpoint (DCP reshards).
"""

from __future__ import annotations

import os

from verl_mega.trainer.checkpoint import find_checkpoint, load_checkpoint, read_marker, save_checkpoint


def newest_actor_checkpoint(root: str) -> str | None:
    """The newest complete actor checkpoint (root/actor/step_N) under the checkpoints directory `root`, or None."""
    actor_root = os.path.join(root, "actor")
    return find_checkpoint(actor_root)[0] if os.path.isdir(actor_root) else None


def latest_checkpoint(root: str) -> str | None:
    """`root` if it holds a complete actor checkpoint (newest step_N under root/actor), else None."""
    return root if newest_actor_checkpoint(root) is not None else None


def saved_layout(root: str) -> dict | None:
    """{"tp", "pp", "dp"} of the newest complete actor checkpoint under `root` (from its COMPLETE marker), None if
    there is none or it does not record one."""
    path = newest_actor_checkpoint(root)
    return read_marker(path).get("layout") if path is not None else None


def save(trainer, root: str, dataloader=None) -> str:
    """Save the trainer at its current global step under `root` (collective), keeping the newest
    `trainer.keep_last` checkpoints of its config (0: all); returns the actor step dir."""
    step, keep_last = trainer.global_step, trainer.config.trainer.keep_last
    extra = {"global_step": step, "kl_coef": trainer.kl_ctl.value if trainer.kl_ctl is not None else None}
    data_state = dataloader.state_dict() if hasattr(dataloader, "state_dict") else None
    path = save_checkpoint(trainer.actor_engine, os.path.join(root, "actor"), step, data_state=data_state,
                           tokenizer_path=trainer.actor.path, keep_last=keep_last, extra=extra)
    if trainer.critic_engine is not None:
        save_checkpoint(trainer.critic_engine, os.path.join(root, "critic"), step, keep_last=keep_last)
    return path


def load(trainer, root: str, dataloader=None) -> int | None:
    """Restore the newest complete checkpoint under `root` (collective); returns its step, None if none."""
    info = load_checkpoint(trainer.actor_engine, os.path.join(root, "actor"))
    if info is None:
        return None
    extra = info["extra"] or {}
    step = int(extra.get("global_step", info["step"]))
    if trainer.critic_engine is not None:
        critic_dir = os.path.join(root, "critic", f"step_{info['step']}")
        if not os.path.isdir(critic_dir):
            raise ValueError(f"checkpoint {info['path']} has no critic at {critic_dir} (saved without a critic?)")
        load_checkpoint(trainer.critic_engine, critic_dir)
    if trainer.kl_ctl is not None and extra.get("kl_coef") is not None:
        trainer.kl_ctl.value = float(extra["kl_coef"])
    if dataloader is not None and info["data_state"] is not None and hasattr(dataloader, "load_state_dict"):
        dataloader.load_state_dict(info["data_state"])
    trainer.global_step = step
    return step
