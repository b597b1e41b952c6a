"""Build a tiny random Hugging Face Qwen2.5-VL directory (config.json + model.safetensors), no processor.

`make_tiny_qwen2_5_vl` writes it with transformers' own `Qwen2_5_VLForConditionalGeneration`
(`save_pretrained`), so loading it exercises the real HF format. The processor / tokenizer files are
added separately (`testing/tiny_vl_processor.py`). Default quirks: an odd vocabulary (251), GQA
(4 query / 2 kv heads), M-RoPE sections (2, 3, 3) of head_dim 16, a 3-block vision tower whose block
1 uses full attention and the others 56-pixel windows (2 x 2 merge units of 14-pixel patches).

Weights are re-drawn at O(1) activation scale (see tiny_hf.py's docstring; fan-in scaling also for
the Conv3d) so that the images move the logits visibly.
"""

from __future__ import annotations

import os

import torch

from verl_mega.testing.tiny_hf import randomize_weights

TINY_VLM_DEFAULTS = dict(  # every default of the tiny VLM, in one place
    vocab_size=251, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
    mrope_section=(2, 3, 3), rope_theta=10000.0, max_position_embeddings=512, tie=False,
    vision_depth=3, vision_hidden_size=32, vision_intermediate_size=48, vision_num_heads=2, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=(1,),
    image_token_id=249, video_token_id=250, vision_start_token_id=247, vision_end_token_id=248,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)


def tiny_vlm_config(**quirks):
    """A transformers `Qwen2_5_VLConfig` with the tiny sizes of TINY_VLM_DEFAULTS overridden by `quirks`."""
    from transformers import Qwen2_5_VLConfig

    unknown = set(quirks) - set(TINY_VLM_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown tiny VLM settings {sorted(unknown)}; known: {sorted(TINY_VLM_DEFAULTS)}")
    c = {**TINY_VLM_DEFAULTS, **quirks}
    ids = {k: c[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    text = dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                num_hidden_layers=c["num_layers"], num_attention_heads=c["num_heads"],
                num_key_value_heads=c["num_kv_heads"], max_position_embeddings=c["max_position_embeddings"],
                rms_norm_eps=1e-6, tie_word_embeddings=c["tie"],
                rope_parameters={"rope_type": "default", "type": "mrope", "mrope_section": list(c["mrope_section"]),
                                 "rope_theta": c["rope_theta"]}, **ids)
    vision = dict(depth=c["vision_depth"], hidden_size=c["vision_hidden_size"],
                  intermediate_size=c["vision_intermediate_size"], num_heads=c["vision_num_heads"],
                  out_hidden_size=c["hidden_size"], patch_size=c["patch_size"],
                  spatial_merge_size=c["spatial_merge_size"], temporal_patch_size=c["temporal_patch_size"],
                  window_size=c["window_size"], fullatt_block_indexes=list(c["fullatt_block_indexes"]))
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=c["image_token_id"],
                            video_token_id=c["video_token_id"], vision_start_token_id=c["vision_start_token_id"],
                            vision_end_token_id=c["vision_end_token_id"], tie_word_embeddings=c["tie"], **ids)


def make_tiny_qwen2_5_vl(path: str | os.PathLike, seed: int = 0, dtype: torch.dtype = torch.float32,
                         **quirks) -> str:
    """Write a random tiny `Qwen2_5_VLForConditionalGeneration` to `path` (no processor); returns `path`.

    `quirks` override TINY_VLM_DEFAULTS (vocab_size, num_kv_heads, mrope_section, vision_depth,
    fullatt_block_indexes, window_size, patch_size, token ids, tie, ...)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_vlm_config(**quirks)).to(torch.float32)
    randomize_weights(model, seed)
    model.to(dtype).save_pretrained(path)
    return path


DEFAULT_ROWS = ((5, ()), (3, ((1, 4, 6),)), (2, ((1, 6, 4), (1, 4, 4))))  # (text tokens, image grids) per row


def tiny_vlm_batch(rows=DEFAULT_ROWS, seed: int = 0, **quirks) -> dict[str, torch.Tensor]:
    """A left-padded batch for the tiny VLM: per row `n` random text tokens, then for each image grid
    (T, H, W) `<vision_start>`, T*H*W/m^2 image tokens, `<vision_end>` and 2 text tokens.

    Returns {"input_ids" [B, S], "attention_mask" [B, S] (pad id 0), "pixel_values" [N_patches, C*T*P*P]
    (random, the images' patches concatenated in row order), "image_grid_thw" [N_images, 3]}."""
    c = {**TINY_VLM_DEFAULTS, **quirks}
    gen = torch.Generator().manual_seed(seed)
    special = min(c["image_token_id"], c["video_token_id"], c["vision_start_token_id"], c["vision_end_token_id"])
    text = lambda n: torch.randint(1, special, (n,), generator=gen).tolist()  # noqa: E731
    merge2 = c["spatial_merge_size"] ** 2
    seqs, grids = [], []
    for n_text, images in rows:
        seq = text(n_text)
        for t, h, w in images:
            seq += [c["vision_start_token_id"]] + [c["image_token_id"]] * (t * h * w // merge2)
            seq += [c["vision_end_token_id"]] + text(2)
            grids.append((t, h, w))
        seqs.append(seq)
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(seqs):
        ids[i, width - len(seq):] = torch.tensor(seq)
        mask[i, width - len(seq):] = 1
    patch = 3 * c["temporal_patch_size"] * c["patch_size"] ** 2
    n_patches = sum(t * h * w for t, h, w in grids)
    return {"input_ids": ids, "attention_mask": mask,
            "pixel_values": torch.randn(n_patches, patch, generator=gen),
            "image_grid_thw": torch.tensor(grids, dtype=torch.long).view(-1, 3)}
