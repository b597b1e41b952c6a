"""Prompt batches for the RL loop: seeded shuffling, data-parallel sharding, resumable position; left padding.

Reference: torch's `DistributedSampler` (per-epoch seeded permutation, padding so every rank gets
the same number of samples) and torchdata's `StatefulDataLoader` (`state_dict` for checkpoint
resume). Items are small dicts of token ids, so batches are plain Python lists built in-process:
no worker processes, nothing to pickle.

Batch k of an epoch on rank r is items perm[(k*dp_size + r)*batch_size : ... + batch_size] of that
epoch's permutation, i.e. `batch_size` is the per-rank batch and one step consumes
`batch_size * dp_size` prompts. The order is a pure function of (seed, epoch), so all ranks agree
without communication and a resumed run continues with exactly the batches it would have seen.
With drop_last=False a short last batch is padded with prompts from the epoch's start so every rank
gets the same count; those repeats are copies carrying `PADDING_KEY: True` (validation leaves them
out of its metrics).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from verl_mega.data.dataset import RLDataset


log = logging.getLogger(__name__)

PADDING_KEY = "is_padding"  # marks an item repeated to pad a short last batch (drop_last=False)


class PromptLoader:
    """Iterable of batches (lists of dataset items) with `state_dict()` / `load_state_dict()`.

    Iterating yields the rest of the current epoch and then moves to the next epoch, so
    `for epoch in range(E): for batch in loader: ...` walks E epochs, resumable at any batch.
    """

    def __init__(
        self,
        dataset: Sequence[dict],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if len(dataset) == 0:
            raise ValueError("dataset is empty (all rows filtered or skipped?)")
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.drop_last, self.dp_rank, self.dp_size = drop_last, dp_rank, dp_size
        self.epoch = 0
        self.index = 0  # batches of the current epoch already yielded
        if len(self) == 0:
            raise ValueError(
                f"dataset of {len(dataset)} prompts gives no full batch of {batch_size} x dp_size {dp_size} "
                "(lower batch_size or set drop_last=False)"
            )

    def __len__(self) -> int:
        """Batches per epoch (the same on every rank)."""
        step = self.batch_size * self.dp_size
        n = len(self.dataset)
        return n // step if self.drop_last else math.ceil(n / step)

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.dataset)))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def _batch_indices(self, order: list[int], k: int) -> tuple[list[int], int]:
        """(this rank's dataset indices of batch k, how many of them are not padding); a short last global
        batch is split evenly, wrapping around to the epoch's start to pad it (as DistributedSampler does)
        so ranks stay in step."""
        step = self.batch_size * self.dp_size
        chunk = order[k * step : (k + 1) * step]
        if len(chunk) < step:
            real, per_rank = len(chunk), math.ceil(len(chunk) / self.dp_size)
            chunk = (chunk + order * math.ceil(step / len(order)))[: per_rank * self.dp_size]
            start = self.dp_rank * per_rank
            return chunk[start : start + per_rank], min(max(real - start, 0), per_rank)
        return chunk[self.dp_rank * self.batch_size : (self.dp_rank + 1) * self.batch_size], self.batch_size

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        if self.index >= len(self):  # stopped (or saved) after an epoch's last batch: the next epoch starts
            self.epoch, self.index = self.epoch + 1, 0
        order = self._order(self.epoch)
        while self.index < len(self):
            k = self.index
            self.index += 1  # advance first: a checkpoint taken after this batch resumes at the next
            indices, real = self._batch_indices(order, k)
            yield [self.dataset[i] if j < real else {**self.dataset[i], PADDING_KEY: True} for j, i in enumerate(indices)]
        self.epoch += 1
        self.index = 0

    def state_dict(self) -> dict[str, int]:
        """Position to resume from: {"epoch", "index" (batches done in the epoch), "seed", "dataset_len",
        "batch_size", "dp_size"}."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "dataset_len": len(self.dataset),
                "batch_size": self.batch_size, "dp_size": self.dp_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a position saved by `state_dict` (same dataset and seed required). A state saved with
        another global batch (batch_size x dp_size) resumes at the same prompt of the epoch's order: the
        epoch's order does not depend on the batch size, so that is exact when the prompts done divide
        by the new global batch, else the next batch boundary (skipping fewer than one batch, logged)."""
        if state.get("dataset_len", len(self.dataset)) != len(self.dataset) or state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"loader state is for a dataset of {state.get('dataset_len')} prompts with seed {state.get('seed')}, "
                f"this loader has {len(self.dataset)} prompts with seed {self.seed}"
            )
        step = self.batch_size * self.dp_size
        saved_step = int(state.get("batch_size", self.batch_size)) * int(state.get("dp_size", self.dp_size))
        done = int(state["index"]) * saved_step  # prompts of the epoch's order already used
        if int(state["index"]) < 0 or done > saved_step * math.ceil(len(self.dataset) / saved_step):
            raise ValueError(f"loader state index {state['index']} (of {saved_step} prompts each) is outside an "
                             f"epoch of {len(self.dataset)} prompts")
        index = min(-(-done // step), len(self))
        if index * step != done and index < len(self):
            log.warning("resuming with %d prompts per step instead of %d: %d prompts of this epoch skipped",
                        step, saved_step, index * step - done)
        self.epoch, self.index = int(state["epoch"]), index


# PromptLoader's keyword options (shuffle, seed, ...): `get_dataloader` passes these to it, their defaults stay there
_LOADER_OPTIONS = frozenset(
    name for name, p in inspect.signature(PromptLoader).parameters.items() if p.kind is p.KEYWORD_ONLY
)


def get_dataloader(
    path_or_dataset: str | Path | Sequence[str | Path] | Sequence[dict],
    tokenizer: Any,
    batch_size: int,
    **options: Any,
) -> PromptLoader:
    """A PromptLoader over an RLDataset built from `path_or_dataset` (or over a dataset given directly).

    `options`: PromptLoader's keywords (shuffle, seed, drop_last, dp_rank, dp_size; their defaults are
    PromptLoader's) go to the loader, the rest to RLDataset (prompt_key, max_prompt_length, filter_overlong,
    image_processor, ...). `batch_size` is per data-parallel rank; pass this rank's `dp_rank` and the `dp_size`.
    """
    loader_options = {k: options.pop(k) for k in _LOADER_OPTIONS & options.keys()}
    if isinstance(path_or_dataset, (str, Path)) or (
        isinstance(path_or_dataset, (list, tuple)) and path_or_dataset and isinstance(path_or_dataset[0], (str, Path))
    ):
        dataset = RLDataset(path_or_dataset, tokenizer, **options)
    else:
        if options:
            raise ValueError(f"dataset options {sorted(options)} given with an already-built dataset")
        dataset = path_or_dataset
    return PromptLoader(dataset, batch_size, **loader_options)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists to one length (prompts end where generation starts).

    Returns:
        input_ids [B, S] long (pad_id on the left), attention_mask [B, S] long (1 on real tokens),
        S = the longest sequence.
    """
    if len(sequences) == 0:
        raise ValueError("left_pad needs at least one sequence")
    tensors = [torch.as_tensor(list(s), dtype=torch.long) for s in sequences]
    input_ids = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=pad_id, padding_side="left")
    lengths = torch.tensor([len(t) for t in tensors])
    seq = input_ids.shape[1]
    attention_mask = (torch.arange(seq)[None, :] >= (seq - lengths)[:, None]).long()  # [B, S]
    return input_ids, attention_mask
