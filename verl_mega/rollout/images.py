"""The images of one generation request: encoded once, shared by the request's n samples.

`PromptImages.encode(model, prompt_ids, pixel_values, image_grid_thw)` runs the first stage's vision
tower (`model.encode_images`) on the prompt's images and computes the prompt's M-RoPE positions
(`models.mrope.mrope_position_ids`, 3 axes: temporal, height, width) and its delta. The engine then
  - at prefill feeds `embeds_between(start, end)` (the vision embeddings of the image-pad tokens among the
    prompt tokens [start, end) it is prefilling, row-major) and `rope_positions(start, end)` [3, end - start];
  - at decode feeds the token's sequence index + `delta` on all 3 axes (for M-RoPE, three equal axes are
    plain RoPE at that position, so a decode step needs only the 1-axis position + delta: CUDA-graph
    friendly, the static buffers stay [B]).
The n samples of a request (and a sample recomputed after preemption) share one `PromptImages`: the
vision tower runs once per prompt, not once per sample.

Reference: transformers' `Qwen2_5_VLForConditionalGeneration.generate` (rope deltas cached after the
prefill, `cache_position + rope_deltas` in decode); vLLM's `MRotaryEmbedding.get_next_input_positions`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from verl_mega.models.mrope import mrope_position_ids


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
    the prompt's image-pad tokens; token_index: [N_img_tokens] long (CPU) the prompt index of each;
    positions: [3, P] long (CPU) the prompt's M-RoPE positions; delta: the offset of every later token
    (sequence index + delta on the 3 axes).
    """

    embeds: torch.Tensor
    token_index: torch.Tensor
    positions: torch.Tensor
    delta: int

    @classmethod
    @torch.no_grad()
    def encode(cls, model, prompt_ids: list[int], pixel_values: torch.Tensor,
               image_grid_thw: torch.Tensor) -> "PromptImages":
        """Encode a prompt's images with `model` (a first-stage `DecoderModel` of a VLM config).

        pixel_values [N_patches, C*T*P*P] (all the prompt's images, concatenated), image_grid_thw
        [N_images, 3]. ValueError when the model has no vision tower, or the prompt's image-pad tokens
        do not match the images (count of tokens vs merged patches)."""
        config = model.config
        if getattr(config, "image_token_id", None) is None or getattr(model, "visual", None) is None:
            raise ValueError("a prompt with images needs a vision-language model (a Qwen2.5-VL config); "
                             f"this model is {getattr(config, 'model_type', type(model).__name__)}")
        grid = torch.as_tensor(image_grid_thw, dtype=torch.long).reshape(-1, 3).cpu()
        ids = torch.tensor([int(t) for t in prompt_ids], dtype=torch.long)[None]  # [1, P]
        token_index = (ids[0] == config.image_token_id).nonzero()[:, 0]  # [N_img_tokens]
        merge = config.vision.spatial_merge_size
        expected = int((grid.prod(-1) // merge**2).sum())
        if expected != len(token_index):
            raise ValueError(f"the prompt has {len(token_index)} image-pad tokens but its images "
                             f"(image_grid_thw {grid.tolist()}) give {expected} vision embeddings")
        positions, deltas = mrope_position_ids(ids, grid, None, image_token_id=config.image_token_id,
                                               vision_start_token_id=config.vision_start_token_id,
                                               spatial_merge_size=merge)  # [3, 1, P], [1]
        param = next(model.parameters())
        # the grid stays on the host, where the tower reads it (on the device it would cost a device -> host copy)
        embeds = model.encode_images(torch.as_tensor(pixel_values).to(param.device, param.dtype),
                                     grid)  # [N_img_tokens, H]
        return cls(embeds, token_index, positions[:, 0].cpu(), int(deltas[0]))

    @property
    def prompt_len(self) -> int:
        return self.positions.shape[1]

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
        lo, hi = torch.searchsorted(self.token_index, torch.tensor([start, end])).tolist()
        return self.embeds[lo:hi]
