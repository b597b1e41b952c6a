"""Forced response lengths for benchmarks with random weights (which never sample EOS themselves).

The semantics every benchmark shares: each response ends with EOS at a seeded length drawn uniformly
from [LO, HI]. The forcing itself is the engine's public `eos_at` hook (`GenerationEngine.add_request`,
`generate_rows`, `RolloutWorker.generate`): the row emits EOS as that token during generation, so it is
freed then (generation time falls with the lengths, as with a model that stops there).

    lengths = draw_lengths(rows, (32, 1024), seed)           # rows ints in [32, 1024]
    engine.add_request(prompt, params, eos_at=lengths[:n])   # engine level
    force_lengths(trainer, (32, 1024))                       # every trainer rollout: lengths drawn per call

`ForcedLengthWorker` wraps a `RolloutWorker`: each `generate` call draws the lengths from its `seed`
argument (the trainer's Rollout stage passes one per step and dp rank, the same on every rank of a
model-parallel group, as `eos_at` must be) or takes fixed ones (`lengths=`).
"""

from __future__ import annotations

import torch


def parse_length_range(text: str | None, max_new_tokens: int | None = None) -> tuple[int, int] | None:
    """'LO:HI' -> (LO, HI) with 1 <= LO <= HI (<= max_new_tokens when given); None/'' -> None."""
    if not text:
        return None
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"--response-len {text!r}: expected LO:HI, e.g. 32:1024") from None
    if not 1 <= lo <= hi or (max_new_tokens is not None and hi > max_new_tokens):
        raise ValueError(f"--response-len {text!r}: need 1 <= LO <= HI"
                         + (f" <= max new tokens ({max_new_tokens})" if max_new_tokens is not None else ""))
    return lo, hi


def draw_lengths(rows: int, length_range: tuple[int, int], seed: int) -> list[int]:
    """`rows` response lengths drawn uniformly from [LO, HI] by a CPU generator seeded with `seed`."""
    lo, hi = length_range
    gen = torch.Generator().manual_seed(seed % 2**63)
    return torch.randint(lo, hi + 1, (rows,), generator=gen).tolist()


class ForcedLengthWorker:
    """A `RolloutWorker` whose responses end with EOS at forced lengths (every other attribute is the
    wrapped worker's). length_range: draw per call from the call's seed; lengths: fixed per-row lengths
    (prompt-major, used for every call). Exactly one of them."""

    def __init__(self, worker, *, length_range: tuple[int, int] | None = None, lengths: list[int] | None = None):
        if (length_range is None) == (lengths is None):
            raise ValueError("ForcedLengthWorker: give exactly one of length_range and lengths")
        self.worker, self.length_range, self.lengths = worker, length_range, lengths

    def generate(self, prompt_ids, *, n: int = 1, seed: int = 0, **kw):
        """`RolloutWorker.generate` with `eos_at` = the fixed lengths or lengths drawn from `seed`."""
        rows = len(prompt_ids) * n
        eos_at = self.lengths if self.lengths is not None else draw_lengths(rows, self.length_range, seed + 1)
        return self.worker.generate(prompt_ids, n=n, seed=seed, eos_at=eos_at, **kw)

    def __getattr__(self, name):
        return getattr(self.worker, name)


def force_lengths(trainer, length_range: tuple[int, int] | None = None, *, lengths: list[int] | None = None,
                  eos_token_id: int | None = None) -> None:
    """Make `trainer`'s rollout stage generate through a `ForcedLengthWorker` (no-op when both are None).

    eos_token_id: the stop token of an actor that names none (a random actor without tokenizer or config
    files); given to the trainer's worker, so call this before the first step (its engine is built then)."""
    if length_range is None and lengths is None:
        return
    stage = next(s for s in trainer.pipeline.stages if getattr(s, "name", None) == "rollout")
    while not hasattr(stage, "worker") and hasattr(stage, "stage"):  # a wrapper (e.g. TrainingStateOffloaded)
        stage = stage.stage
    worker = stage.worker.worker if isinstance(stage.worker, ForcedLengthWorker) else stage.worker
    if not worker.eos_token_ids:
        if eos_token_id is None:
            raise ValueError("force_lengths: the actor names no EOS token; pass eos_token_id")
        worker.eos_token_ids = (int(eos_token_id),)
    stage.worker = ForcedLengthWorker(worker, length_range=length_range, lengths=lengths)
