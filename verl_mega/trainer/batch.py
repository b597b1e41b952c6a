"""`RLBatch`: what flows through the dataflow stages of one RL step — prompts in, tensors and metrics out.

Rows are responses, ordered prompt-major: rows i*n .. i*n+n-1 answer prompt i (the GRPO group).
A full sequence is [prompt | response]: the prompt left-padded to P tokens, the response
right-padded to R tokens, so every row's response starts at column P and the log-prob of
response token t is predicted by the hidden state at column P + t - 1.

Each stage fills some fields (None until then); `microbatches()` cuts row subsets into the
dicts of tensors the training engine consumes, padded or packed (see packing.py), by a row count or
a token budget. Reference: verl's `DataProto` (a TensorDict plus non-tensor lists), reduced to a dataclass.

Images (vision-language models): a prompt's images travel once per prompt (`pixel_values`,
`image_grid_thw`: B entries, shared by the prompt's n rows). A micro-batch of such a batch carries the
images of its DISTINCT prompts once ("pixel_values", "image_grid_thw", in order of first appearance),
"image_index" (for every image-pad token of its rows, row-major, the row of the encoded images that fills
it: the rows of one prompt share one encoding, and their gradients add up in it) and 3-axis
"position_ids" [3, b, S] (M-RoPE, `models.mrope`; packed: [3, 1, T]), computed here from the sequences so
every pass (old / reference log-probs, update) sees the positions the rollout used. Rows re-dealt over
data-parallel ranks (packing + token budget, dp > 1) take their prompts' images with them
(packing.redeal_images: only the images the receiving rank's rows need), so a micro-batch of re-dealt rows is
built the same way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from verl_mega.data.loader import left_pad
from verl_mega.models.mrope import mrope_position_ids
from verl_mega.trainer.packing import (balance_over_dp, microbatch_to, pack_microbatch, redeal_images,
                                       token_budget_groups)

# tensors a micro-batch needs for a forward pass (the rest are added by name)
SEQUENCE_KEYS = ("input_ids", "attention_mask", "position_ids", "responses", "response_mask")


@dataclass(frozen=True)
class ImageTokens:
    """What the M-RoPE positions of a VLM's sequences depend on (from its `ModelConfig`)."""

    image_token_id: int
    vision_start_token_id: int
    spatial_merge_size: int

    @classmethod
    def from_config(cls, config) -> "ImageTokens | None":
        """The config's image tokens, or None for a text model."""
        if getattr(config, "image_token_id", None) is None:
            return None
        return cls(int(config.image_token_id), int(config.vision_start_token_id),
                   int(config.vision.spatial_merge_size))

    def position_ids(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                     attention_mask: torch.Tensor) -> torch.Tensor:
        """[3, b, S] M-RoPE positions of padded rows input_ids / attention_mask [b, S] whose images have the
        grids image_grid_thw [N_images, 3] (row-major; None: no image)."""
        positions, _ = mrope_position_ids(input_ids, image_grid_thw, attention_mask,
                                          image_token_id=self.image_token_id,
                                          vision_start_token_id=self.vision_start_token_id,
                                          spatial_merge_size=self.spatial_merge_size)
        return positions


def padded_response_width(prompt_len: int, response_len: int, multiple: int = 1) -> int:
    """The response width R >= response_len of a batch whose prompts are prompt_len wide, so that the sequence
    width prompt_len + R is a multiple of `multiple` (trainer.pad_to_multiple_of; 1: response_len)."""
    return -(-(prompt_len + response_len) // multiple) * multiple - prompt_len


def check_token_ids(input_ids: torch.Tensor, rows: torch.Tensor, vocab: int) -> None:
    """ValueError naming the first batch row whose ids (input_ids [b, S], row b being batch row rows[b]) leave
    [0, vocab)."""
    bad = (input_ids < 0) | (input_ids >= vocab)  # [b, S]
    if bad.any():
        i = int(bad.any(-1).nonzero()[0, 0])
        raise ValueError(f"batch row {int(rows[i])} holds token ids outside the model's vocabulary [0, {vocab}): "
                         f"{input_ids[i][bad[i]][:5].tolist()}")


def sample_images(samples: list[dict]) -> tuple[list | None, list | None]:
    """(pixel_values, image_grid_thw), one entry per sample (None where it has no image), of dataset items
    carrying "pixel_values" [N_patches, D] and "image_grid_thw" [N_images, 3] (data/multimodal.py; N_images
    may be 0); (None, None) when no sample has an image."""
    if not any(s.get("pixel_values") is not None and len(s.get("image_grid_thw", ())) for s in samples):
        return None, None
    pixel_values, grids = [], []
    for i, s in enumerate(samples):
        pv, grid = s.get("pixel_values"), s.get("image_grid_thw")
        if (pv is None) != (grid is None):
            raise ValueError(f"sample {i} has only one of 'pixel_values' and 'image_grid_thw'")
        grid = None if grid is None else torch.as_tensor(grid, dtype=torch.long).reshape(-1, 3)
        empty = grid is None or grid.shape[0] == 0  # a multimodal dataset's row without images
        pixel_values.append(None if empty else torch.as_tensor(pv))
        grids.append(None if empty else grid)
    return pixel_values, grids


@dataclass
class RLBatch:
    """One step's data. B = len(samples) prompts, N = B * n rows, P / R = prompt / response columns."""

    samples: list[dict]  # B prompt samples (dataset items or user dicts: prompt, ground_truth, extra_info ...)
    prompt_ids: list[list[int]]  # B token-id prompts
    n: int = 1  # responses per prompt
    step: int = 0  # global step this batch belongs to (seeds sampling and shuffling)
    # --- rollout
    input_ids: torch.Tensor | None = None  # [N, P + R] long
    attention_mask: torch.Tensor | None = None  # [N, P + R] long, 1 = token
    position_ids: torch.Tensor | None = None  # [N, P + R] long
    responses: torch.Tensor | None = None  # [N, R] long, right-padded
    response_mask: torch.Tensor | None = None  # [N, R] float, 1 = generated token (stop token included)
    rollout_logprobs: torch.Tensor | None = None  # [N, R] float, the sampler's log-probs
    # [N, R] float, 1 = a token the model sampled (trained on); None = every response token. Multi-turn rows
    # hold tool-result / template tokens that exist (response_mask, attention) but are not trained on.
    loss_mask: torch.Tensor | None = None
    response_texts: list[str] | None = None  # N decoded responses (special tokens skipped)
    # --- images (VLM; None for text): per PROMPT, shared by its n rows (see the module docstring)
    pixel_values: list[torch.Tensor | None] | None = None  # B entries: [N_patches, C*T*P*P] or None (no image)
    image_grid_thw: list[torch.Tensor | None] | None = None  # B entries: [N_images, 3] long or None
    image_tokens: ImageTokens | None = None  # the model's image tokens (M-RoPE positions); None for text models
    # --- reward
    scores: torch.Tensor | None = None  # [N] float, outcome reward per response
    reward_failures: int = 0  # reward calls that raised / returned a non-number
    reward_timeouts: int = 0  # reward calls past the time limit
    reward_errors: list[str] = field(default_factory=list)  # first few failure messages
    # --- log-probs
    old_logprobs: torch.Tensor | None = None  # [N, R] actor log-probs before the update
    ref_logprobs: torch.Tensor | None = None  # [N, R] reference policy log-probs (KL)
    values: torch.Tensor | None = None  # [N, R] critic values (PPO)
    # --- advantage
    token_rewards: torch.Tensor | None = None  # [N, R] rewards on tokens (outcome on the last token, minus KL)
    advantages: torch.Tensor | None = None  # [N, R]
    returns: torch.Tensor | None = None  # [N, R]
    # --- bookkeeping
    metrics: dict[str, float] = field(default_factory=dict)  # filled by the stages; the step's result
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage / phase
    extras: dict[str, Any] = field(default_factory=dict)  # free space for user stages

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_rows(self) -> int:
        return len(self.prompt_ids) * self.n

    @property
    def row_samples(self) -> list[dict]:
        """The sample of every row (prompt-major)."""
        return [s for s in self.samples for _ in range(self.n)]

    @property
    def is_vlm(self) -> bool:
        """Whether the batch is a VLM batch (3-axis positions, image inputs in its micro-batches)."""
        return self.image_tokens is not None

    def prompt_images(self) -> list[tuple[torch.Tensor, torch.Tensor] | None] | None:
        """Per prompt: (pixel_values, image_grid_thw) or None (no image); None for a text batch (the
        rollout's `images=` argument)."""
        if self.pixel_values is None:
            return None
        return [None if pv is None else (pv, grid) for pv, grid in zip(self.pixel_values, self.image_grid_thw)]

    def own_images(self, rows: torch.Tensor) -> tuple[list[int], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """(the prompt index of each of `rows` [b], {prompt index: (pixel_values [N_patches, D], image_grid_thw
        [N_images, 3])} of those prompts that have images): the arguments of `vision_inputs`."""
        prompts = (rows // self.n).tolist()
        images = {p: (torch.as_tensor(self.pixel_values[p]),
                      torch.as_tensor(self.image_grid_thw[p], dtype=torch.long).reshape(-1, 3))
                  for p in dict.fromkeys(prompts) if self.pixel_values and self.pixel_values[p] is not None}
        return prompts, images

    def vision_inputs(self, prompts: list[int], images: dict[int, tuple[torch.Tensor, torch.Tensor]],
                      input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The image fields of a micro-batch whose rows, with sequences input_ids / attention_mask [b, S], answer
        the prompts with keys `prompts` [b] (any ints: local prompt indices, or the global keys of rows re-dealt
        over dp); `images`: key -> (pixel_values [N_patches, D], image_grid_thw [N_images, 3]) of the keys with
        images (see the module docstring). Returns position_ids [3, b, S], and when any row has images
        "pixel_values" [N_patches, D] and "image_grid_thw" [N_images, 3] of its distinct prompts, "image_index"
        [N_pad_tokens]."""
        with_images = [p for p in prompts if p in images]
        row_grids = torch.cat([images[p][1] for p in with_images]) if with_images else None  # rows' images, in order
        out = {"position_ids": self.image_tokens.position_ids(input_ids, row_grids, attention_mask)}
        if not with_images:
            return out
        distinct = list(dict.fromkeys(with_images))  # first appearance order
        merge2 = self.image_tokens.spatial_merge_size ** 2
        tokens = {p: int((images[p][1].prod(-1) // merge2).sum()) for p in distinct}  # image-pad tokens of a prompt
        start, offset = {}, 0
        for p in distinct:
            start[p], offset = offset, offset + tokens[p]
        out["pixel_values"] = torch.cat([images[p][0] for p in distinct])
        out["image_grid_thw"] = torch.cat([images[p][1] for p in distinct])
        out["image_index"] = torch.cat([torch.arange(start[p], start[p] + tokens[p]) for p in with_images])
        return out

    @property
    def train_mask(self) -> torch.Tensor | None:
        """[N, R] the tokens log-probs, KL, advantages and the loss use: `loss_mask`, or `response_mask`."""
        return self.loss_mask if self.loss_mask is not None else self.response_mask

    def set_rollout(self, responses: list[list[int]], logprobs: list[list[float]], pad_id: int,
                    loss_masks: list[list[int]] | None = None, width_multiple: int = 1) -> None:
        """Fill the sequence tensors from N response token lists (and their sampler log-probs; optional
        per-token loss masks, 1 = model token, same lengths as the responses). `width_multiple`: the response
        width R is padded so that the sequence width P + R is a multiple of it (trainer.pad_to_multiple_of)."""
        if len(responses) != self.num_rows:
            raise ValueError(f"got {len(responses)} responses for {self.num_prompts} prompts x n={self.n}")
        prompts = [p for p in self.prompt_ids for _ in range(self.n)]
        prompt_ids, prompt_mask = left_pad(prompts, pad_id)  # [N, P]
        r_len = padded_response_width(prompt_ids.shape[1], max(1, max(len(r) for r in responses)), width_multiple)
        resp = torch.full((len(responses), r_len), pad_id, dtype=torch.long)
        resp_mask = torch.zeros(len(responses), r_len)
        lps = torch.zeros(len(responses), r_len)
        for i, (r, lp) in enumerate(zip(responses, logprobs)):
            resp[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            resp_mask[i, :len(r)] = 1.0
            lps[i, :len(lp)] = torch.tensor(lp, dtype=torch.float32)
        self.input_ids = torch.cat([prompt_ids, resp], dim=1)  # [N, P + R]
        self.attention_mask = torch.cat([prompt_mask, resp_mask.long()], dim=1)
        self.position_ids = (self.attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.responses, self.response_mask, self.rollout_logprobs = resp, resp_mask, lps
        self.loss_mask = None
        if loss_masks is not None:
            self.loss_mask = torch.zeros(len(responses), r_len)
            for i, (r, m) in enumerate(zip(responses, loss_masks)):
                if len(m) != len(r):
                    raise ValueError(f"loss_masks[{i}] has {len(m)} entries for a response of {len(r)} tokens")
                self.loss_mask[i, :len(m)] = torch.tensor(m, dtype=torch.float32)

    def microbatches(self, size: int, rows: torch.Tensor | None = None, keys: tuple[str, ...] = (),
                     device: torch.device | None = None, *, packed: bool = False, max_tokens: int | None = None,
                     dp_group=None, vocab: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Dicts of the sequence tensors (+ `keys`) for `rows` (default all), each with "rows" [b] (their
        indices in the batch, to put per-row outputs back in order).

        `size` rows each (last may be smaller), or with `max_tokens` at most that many valid tokens each
        (see packing.token_budget_groups; sequences longer than the budget get their own micro-batch and
        are counted in metrics["batch/oversized_sequences"]). `packed`: one row of valid tokens per
        micro-batch (packing.pack_microbatch) instead of padded rows. `dp_group` (collective): first re-deal
        the rows of all its ranks for equal token counts (packing.balance_over_dp; with their prompts' images,
        packing.redeal_images); "rows" then holds global row ids (packing.gather_to_owners brings per-row
        results back). `vocab`: every id of the rows (prompt, response, padding) must lie in [0, vocab), checked
        here on the host so that the GPU passes need not check their labels (`fused_logprob_entropy(check_labels=
        False)`, which would wait for each micro-batch's forward).
        """
        if self.input_ids is None:
            raise ValueError("microbatches(): the batch has no sequences yet (run the Rollout stage first)")
        rows = torch.arange(self.num_rows) if rows is None else rows
        missing = [k for k in keys if getattr(self, k) is None]
        if missing:
            raise ValueError(f"microbatches(): batch fields {missing} are not set by any earlier stage")
        tensors = {k: getattr(self, k)[rows] for k in SEQUENCE_KEYS + tuple(keys)}
        tensors["loss_mask"] = self.train_mask[rows]  # [rows, R] the tokens the loss uses
        if vocab is not None:
            check_token_ids(tensors["input_ids"], rows, vocab)
        prompts, images = self.own_images(rows) if self.is_vlm else (None, None)
        if dp_group is not None and dist.get_world_size(dp_group) > 1:
            tensors, rows = balance_over_dp(tensors, self.input_ids.shape[1] - self.responses.shape[1], dp_group)
            if self.is_vlm:  # the re-dealt rows take their prompts' images with them
                prompts, images = redeal_images(images, prompts, rows, dp_group)
        if max_tokens is None:
            groups = [torch.arange(start, min(start + size, len(rows))) for start in range(0, len(rows), size)]
        else:
            lengths = tensors["attention_mask"].sum(-1).tolist()
            index_groups, oversized = token_budget_groups(lengths, max_tokens)
            if oversized:
                warnings.warn(f"{oversized} sequence(s) longer than trainer.max_tokens_per_micro_batch={max_tokens} "
                              f"(longest {max(lengths)}) each got a micro-batch of their own", stacklevel=2)
            self.metrics["batch/oversized_sequences"] = self.metrics.get("batch/oversized_sequences", 0.0) + oversized
            groups = [torch.tensor(g, dtype=torch.long) for g in index_groups]
        out = []
        for idx in groups:
            mb = {k: v[idx] for k, v in tensors.items()}
            mb["rows"] = rows[idx]
            vision = self.vision_inputs([prompts[i] for i in idx.tolist()], images, mb["input_ids"],
                                        mb["attention_mask"]) if self.is_vlm else {}
            if vision:
                mb["position_ids"] = vision.pop("position_ids")  # [3, b, S]
            if packed:
                mb = pack_microbatch(mb)
            mb.update(vision)  # after packing: image tensors are not sequence tensors
            out.append(microbatch_to(mb, device) if device is not None else mb)
        return out
