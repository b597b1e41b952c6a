"""Where step metrics go: a JSONL file, TensorBoard scalars, and a tqdm progress bar (rank 0 only).

`metrics.jsonl` has one object per logged step: {"step": k, "time": unix seconds, **metrics}; it is
appended to, so a resumed run continues the same file, after dropping the records past the step it resumes
from (steps trained after the last checkpoint and trained again, which would appear twice). TensorBoard uses
`torch.utils.tensorboard.SummaryWriter` (event files in `output_dir/tensorboard`; its `purge_step` does the
same there).

The metric names (one per quantity, verl's naming style: actor/, critic/, reward/, response_length/,
time/, throughput/) are listed with their meaning in docs/metrics.md. `format_metrics` prints them
with 3 significant digits (a learning rate of 1e-6 shows as 1e-06, not 0.0); `run_banner` is the
summary printed by rank 0 when a run starts.
"""

from __future__ import annotations

import json
import math
import os
import time

from omegaconf import MISSING
from tqdm.auto import tqdm

from verl_mega.trainer.config import micro_batch_sizes

# metrics shown live on the progress bar: (label, keys tried in order)
BAR_KEYS = (("reward", ("reward/mean",)), ("kl", ("actor/kl_ref", "actor/ppo_kl")), ("ent", ("actor/entropy",)),
            ("len", ("response_length/mean",)))


class MetricsLogger:
    """Writes metrics on the rank given `enabled=True`; a no-op elsewhere."""

    def __init__(self, output_dir: str | None, *, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int = 0):
        """resume_step: the checkpoint step a resumed run starts from (> 0): records of later steps, logged before
        the run stopped and about to be logged again, are dropped from metrics.jsonl and TensorBoard."""
        self.enabled = enabled and output_dir is not None
        self.path = None
        self.writer = None
        if not self.enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if resume_step > 0 and os.path.exists(self.path):
            _drop_records_after(self.path, resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step > 0 else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Append one step's metrics (non-finite values are written as null in JSON)."""
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        if self.writer is not None:
            for k, v in clean.items():
                if v is not None:
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _drop_records_after(path: str, step: int) -> None:
    """Rewrite the metrics.jsonl `path` without its records of steps > `step` (atomically: a temporary file,
    then a rename); lines that are not such records are kept as they are."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()

    def later(line: str) -> bool:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            return False
        return isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step

    kept = [line for line in lines if not later(line)]
    if len(kept) == len(lines):
        return
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over RL steps (disabled off rank 0)."""
    return tqdm(total=total, initial=initial, disable=not enabled, desc="RL", dynamic_ncols=True, unit="step")


def bar_postfix(metrics: dict[str, float]) -> dict[str, str]:
    """The live values shown on the bar (the first present key of each BAR_KEYS entry)."""
    out = {}
    for label, keys in BAR_KEYS:
        key = next((k for k in keys if k in metrics), None)
        if key is not None:
            out[label] = f"{metrics[key]:.3g}"
    return out


def format_metrics(metrics: dict[str, float], skip_prefixes: tuple[str, ...] = ()) -> str:
    """`key: value` pairs (3 significant digits, sorted by key) of the metrics whose key starts with
    none of `skip_prefixes`, one line."""
    return ", ".join(f"{k}: {v:.3g}" for k, v in sorted(metrics.items()) if not k.startswith(skip_prefixes))


def run_banner(config, layout, dataset_size: int | None, steps: int, output_dir: str, start_step: int = 0,
               dropped: int = 0) -> str:
    """The lines rank 0 prints when `fit` starts: model, layout, algorithm, data, steps, output.

    Args:
        config: the run's TrainerConfig.
        layout: the actor's Layout (tp, pp, dp, world_size).
        dataset_size: prompts in the dataset (None when the dataloader does not say).
        steps: the step `fit` trains up to; start_step: the step it starts from (> 0 after a resume).
        dropped: prompts the dataset dropped as longer than data.max_prompt_length (image tokens included).
    """
    c, t, r = config, config.trainer, config.rollout
    data = f"{dataset_size} prompts" if dataset_size is not None else "size unknown"
    if c.data.train_path not in (None, MISSING):
        data += f" from {c.data.train_path}"
    if dropped:
        data += f" ({dropped} longer than data.max_prompt_length={c.data.max_prompt_length} tokens dropped)"
    return "\n".join([
        f"[verl-mega] model {c.model.path} ({c.model.dtype})",
        f"[verl-mega] layout tp={layout.tp} pp={layout.pp} dp={layout.dp} (world {layout.world_size}), "
        f"generation tp={c.parallel.tp_g or layout.tp}",
        f"[verl-mega] algorithm {c.algorithm.name}, kl_coef {c.algorithm.kl_coef:g}, lr {c.optim.lr:g}, "
        f"{t.rollout_batch_size} prompts x {r.n_samples} samples per step per dp rank",
        f"[verl-mega] dataset {data}",
        f"[verl-mega] micro-batches {_micro_batch_text(t)}",
        f"[verl-mega] steps {start_step} -> {steps}, output {os.path.abspath(output_dir)}",
    ])


def _micro_batch_text(trainer_cfg) -> str:
    """What one forward/backward and one forward-only pass hold, e.g. '8192 tokens (update), 32768 tokens
    (forward-only), packed'."""
    def size(forward_only: bool) -> str:
        sequences, tokens = micro_batch_sizes(trainer_cfg, forward_only)
        return f"{tokens} tokens" if tokens is not None else f"{sequences} sequences"

    return f"{size(False)} (update), {size(True)} (forward-only), {'packed' if trainer_cfg.packing else 'padded'}"
