"""Random prompts with images for a vision-language model, without a processor (tests, benchmarks).

`image_prompts(config, grids, seed)` -> (token ids, images): each prompt is a few random text ids, then per
image `<|vision_start|>` + one image-pad token per merged patch + `<|vision_end|>` + two text ids (the
layout the Qwen2.5-VL processor writes), and its (pixel_values [N_patches, C*T*P*P] ~ N(0, 1),
image_grid_thw [N_images, 3]) — or None for a prompt without images. Real pixels go through the
transformers processor (data/multimodal.py); these only need the right shapes.
"""

from __future__ import annotations

import torch


def image_prompts(config, grids: list[list[tuple[int, int, int]]], seed: int = 0, text_len: int = 3
                  ) -> tuple[list[list[int]], list[tuple[torch.Tensor, torch.Tensor] | None]]:
    """Prompts for `config` (a VLM `ModelConfig`), one per entry of `grids` (its images' (t, h, w) in patches;
    [] = text only). Text ids are any ids but 0 and the vision placeholders; prompt k starts with text_len + k."""
    vis = config.vision
    merge, patch, temporal = vis.spatial_merge_size, vis.patch_size, vis.temporal_patch_size
    channels = getattr(vis, "in_channels", 3)
    image, start = config.image_token_id, config.vision_start_token_id
    extra = getattr(config, "hf_extra", None) or {}
    end = extra.get("vision_end_token_id") or start + 1
    special = {image, start, end, extra.get("video_token_id")}
    text_ids = torch.tensor([t for t in range(1, config.vocab_size) if t not in special])  # never a placeholder
    gen = torch.Generator().manual_seed(seed)

    def text(count: int) -> list[int]:
        return text_ids[torch.randint(len(text_ids), (count,), generator=gen)].tolist()

    prompts, images = [], []
    for k, prompt_grids in enumerate(grids):
        ids = text(text_len + k)
        for t, h, w in prompt_grids:
            if h % merge or w % merge:
                raise ValueError(f"grid {(t, h, w)}: h and w must be multiples of spatial_merge_size={merge}")
            ids += [start] + [image] * (t * h * w // merge**2) + [end]
            ids += text(2)
        prompts.append(ids)
        if prompt_grids:
            patches = sum(t * h * w for t, h, w in prompt_grids)
            pixel_values = torch.randn(patches, channels * temporal * patch * patch, generator=gen)
            images.append((pixel_values, torch.tensor(prompt_grids, dtype=torch.long)))
        else:
            images.append(None)
    return prompts, images
