"""The images of one generation request: prepared on the host when it is queued, encoded at admission.

Two steps, so that the vision tower runs once per admission step rather than once per prompt:
  - `PromptImages.prepare(model, prompt_ids, pixel_values, image_grid_thw)` (at `add_request`, host only):
    checks the inputs (the prompt's image-pad count against the grid: ValueError), computes the prompt's
    M-RoPE positions (`models.mrope.mrope_position_ids`, 3 axes: temporal, height, width), its delta and the
    prompt index of each image-pad token, and keeps pixel_values + grid as given (no device memory is
    taken while the request waits);
  - `encode_pending(model, images)` (at admission, before each prefill forward): ONE call of the first
    stage's vision tower (`model.encode_images`) over the concatenated pixel_values and grids of every
    not-yet-encoded `PromptImages` of that forward (the engine slices a prefill by `prefill_tokens`); the output rows are split per request by its
    image-pad count (a host int: no device -> host sync) and the pixel_values are dropped. The tower's
    attention is per window / per image (cu_seqlens), so a request's rows do not depend on its neighbours.
The engine then
  - at prefill feeds `embeds_between(start, end)` (the vision embeddings of the image-pad tokens among the
    prompt tokens [start, end) it is prefilling, row-major) and `rope_positions(start, end)` [3, end - start];
  - at decode feeds the token's sequence index + `delta` on all 3 axes (for M-RoPE, three equal axes are
    plain RoPE at that position, so a decode step needs only the 1-axis position + delta: CUDA-graph
    friendly, the static buffers stay [B]).
The n samples of a request (and a sample recomputed after preemption) share one `PromptImages`: it is
encoded once, at the first admission of any of them, never again.

Reference: transformers' `Qwen2_5_VLForConditionalGeneration.generate` (rope deltas cached after the
prefill, `cache_position + rope_deltas` in decode); vLLM's `MRotaryEmbedding.get_next_input_positions`;
vLLM v1's model runner (the multimodal inputs of the requests scheduled in a step encoded together).

Simplification: the embeddings of one admission step are views of one tower output, freed when the last
request of that step is done with them (1 MiB per 448 x 448 image at the Qwen2.5-VL-3B shape: 256 rows x
2048, bf16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from verl_mega.models.mrope import mrope_position_ids
from verl_mega.models.vision import check_grids


def image_token_ids(config) -> tuple[int, ...]:
    """Placeholder ids a VLM must never sample (its image / video pad tokens: generated, they would be
    taken for image slots by every later forward); () for a text model."""
    if getattr(config, "image_token_id", None) is None:
        return ()
    video = getattr(config, "video_token_id", None) or (getattr(config, "hf_extra", None) or {}).get("video_token_id")
    return tuple(int(t) for t in (config.image_token_id, video) if t is not None)


@dataclass
class PromptImages:
    """One prompt's vision inputs, ready for the engine (see the module docstring).

    embeds: [N_img_tokens, H] the vision tower's output (model dtype, model device), row-major over
    the prompt's image-pad tokens, or None until `encode_pending` ran; token_index: [N_img_tokens] long (CPU)
    the prompt index of each; positions: [3, P] long (CPU) the prompt's M-RoPE positions; delta: the offset
    of every later token (sequence index + delta on the 3 axes); pixel_values [N_patches, C*T*P*P] (where
    the caller gave them) and image_grid_thw [N_images, 3] long (CPU): the images to encode, pixel_values
    None once encoded.
    """

    embeds: torch.Tensor | None
    token_index: torch.Tensor
    positions: torch.Tensor
    delta: int
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None

    @classmethod
    def prepare(cls, model, prompt_ids: list[int], pixel_values: torch.Tensor,
                image_grid_thw: torch.Tensor) -> "PromptImages":
        """A prompt's images, checked and positioned on the host, not encoded yet (`encode_pending` does that).

        model: a first-stage `DecoderModel` of a VLM config; pixel_values [N_patches, C*T*P*P] (all the
        prompt's images, concatenated), image_grid_thw [N_images, 3]. ValueError when the model has no vision
        tower, the grid does not fit the pixel values, or the prompt's image-pad tokens do not match the images
        (count of tokens vs merged patches)."""
        config = model.config
        if getattr(config, "image_token_id", None) is None or getattr(model, "visual", None) is None:
            raise ValueError("a prompt with images needs a vision-language model (a Qwen2.5-VL config); "
                             f"this model is {getattr(config, 'model_type', type(model).__name__)}")
        grid = torch.as_tensor(image_grid_thw, dtype=torch.long).reshape(-1, 3).cpu()
        ids = torch.tensor([int(t) for t in prompt_ids], dtype=torch.long)[None]  # [1, P]
        token_index = (ids[0] == config.image_token_id).nonzero()[:, 0]  # [N_img_tokens]
        merge = config.vision.spatial_merge_size
        expected = int(grid.prod(-1).sum()) // merge**2
        if expected != len(token_index):
            raise ValueError(f"the prompt has {len(token_index)} image-pad tokens but its images "
                             f"(image_grid_thw {grid.tolist()}) give {expected} vision embeddings")
        pixel_values = torch.as_tensor(pixel_values)
        check_grids(pixel_values, grid, config.vision)  # the tower's own input check, now rather than at admission
        positions, deltas = mrope_position_ids(ids, grid, None, image_token_id=config.image_token_id,
                                               vision_start_token_id=config.vision_start_token_id,
                                               spatial_merge_size=merge)  # [3, 1, P], [1]
        return cls(None, token_index, positions[:, 0].cpu(), int(deltas[0]), pixel_values, grid)

    @property
    def prompt_len(self) -> int:
        return self.positions.shape[1]

    @property
    def num_embeds(self) -> int:
        """Rows of the tower's output for this prompt (= its image-pad tokens)."""
        return len(self.token_index)

    def rope_positions(self, start: int, end: int) -> torch.Tensor:
        """[3, end - start] long: M-RoPE positions of sequence indices [start, end) (prompt positions, then
        index + delta)."""
        index = torch.arange(start, end)
        after = (index + self.delta).expand(3, -1)  # [3, S]
        inside = index < self.prompt_len
        return torch.where(inside, self.positions[:, index.clamp(max=self.prompt_len - 1)], after)

    def embeds_between(self, start: int, end: int) -> torch.Tensor:
        """[k, H] the embeddings of the image-pad tokens at prompt indices [start, end), in order: a slice of
        `embeds` (token_index is sorted; bounds found on the host, so no boolean indexing and no device sync)."""
        assert self.embeds is not None, "embeds_between() before encode_pending(): the engine encodes at admission"
        lo, hi = torch.searchsorted(self.token_index, torch.tensor([start, end])).tolist()
        return self.embeds[lo:hi]


@torch.no_grad()
def encode_pending(model, images: list[PromptImages]) -> int:
    """Encode every not-yet-encoded entry of `images` in ONE `model.encode_images` call; returns the entries
    encoded (0: no tower call).

    The pixel values are concatenated in order (each moved to the model's device and dtype, as the tower
    expects; fp32 pixels into a bf16 tower are rounded there) with their grids [sum N_images, 3] (kept on the
    host, where the tower reads them); the output [sum N_img_tokens, H] is split by each entry's `num_embeds`
    (host ints), each entry keeps its rows as `embeds` and drops its pixel_values. An entry listed twice (the
    samples of one request admitted as separate groups) is encoded once."""
    pending = list({id(p): p for p in images if p.embeds is None}.values())
    if not pending:
        return 0
    param = next(model.parameters())
    pixels = torch.cat([p.pixel_values.to(param.device, param.dtype) for p in pending])  # [sum N_patches, C*T*P*P]
    grids = torch.cat([p.image_grid_thw for p in pending])  # [sum N_images, 3] host
    embeds = model.encode_images(pixels, grids)  # [sum N_img_tokens, H]
    for p, rows in zip(pending, embeds.split([p.num_embeds for p in pending])):
        p.embeds, p.pixel_values = rows, None
    return len(pending)
