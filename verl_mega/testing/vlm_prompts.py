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
    [] = text only). Text ids are drawn below the smallest special id; prompt k starts with text_len + k."""
    vis = config.vision
    merge, patch, temporal = vis.spatial_merge_size, vis.patch_size, vis.temporal_patch_size
    channels = getattr(vis, "in_channels", 3)
    image, start = config.image_token_id, config.vision_start_token_id
    end = getattr(config, "vision_end_token_id", None) or start + 1
    text_vocab = min(image, start, end, config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    prompts, images = [], []
    for k, prompt_grids in enumerate(grids):
        ids = torch.randint(1, text_vocab, (text_len + k,), generator=gen).tolist()
        for t, h, w in prompt_grids:
            if h % merge or w % merge:
                raise ValueError(f"grid {(t, h, w)}: h and w must be multiples of spatial_merge_size={merge}")
            ids += [start] + [image] * (t * h * w // merge**2) + [end]
            ids += torch.randint(1, text_vocab, (2,), generator=gen).tolist()
        prompts.append(ids)
        if prompt_grids:
            patches = sum(t * h * w for t, h, w in prompt_grids)
            pixel_values = torch.randn(patches, channels * temporal * patch * patch, generator=gen)
            images.append((pixel_values, torch.tensor(prompt_grids, dtype=torch.long)))
        else:
            images.append(None)
    return prompts, images
