"""Where step metrics go: a JSONL file, TensorBoard scalars, and a tqdm progress bar (rank 0 only).

`metrics.jsonl` has one object per logged step: {"step": k, "time": unix seconds, **metrics}; it is
appended to, so a resumed run continues the same file. TensorBoard uses
`torch.utils.tensorboard.SummaryWriter` (event files in `output_dir/tensorboard`).
"""

from __future__ import annotations

import json
import math
import os
import time

from tqdm.auto import tqdm

# metrics shown live on the progress bar: (key, label)
BAR_KEYS = (("reward_mean", "reward"), ("kl", "kl"), ("entropy", "ent"), ("response_length", "len"))


class MetricsLogger:
    """Writes metrics on the rank given `enabled=True`; a no-op elsewhere."""

    def __init__(self, output_dir: str | None, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled and output_dir is not None
        self.path = None
        self.writer = None
        if not self.enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

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


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over RL steps (disabled off rank 0)."""
    return tqdm(total=total, initial=initial, disable=not enabled, desc="RL", dynamic_ncols=True, unit="step")


def bar_postfix(metrics: dict[str, float]) -> dict[str, str]:
    """The live values shown on the bar."""
    return {label: f"{metrics[k]:.3g}" for k, label in BAR_KEYS if k in metrics}
