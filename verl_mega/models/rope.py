"""Rotary position embedding (RoPE) of the decoder: inverse frequencies, cos/sin tables, the rotation.

Follows transformers' Llama / Qwen2 / Qwen3 rotary embedding numerically: cos/sin are computed in fp32
(and only then cast to the activations' dtype), rotate-half convention, `rope_theta` with the optional
"linear" or "llama3" frequency scaling (`ModelConfig.rope_scaling`). M-RoPE (Qwen2-VL / Qwen2.5-VL,
`ModelConfig.mrope_section`) splits the frequencies over three position axes (t, h, w); the position ids
themselves are built in `mrope.py`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from verl_mega.models.config import ModelConfig


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse RoPE frequencies [head_dim/2] (fp32) for rope_theta and the optional llama3/linear scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given position ids. inv_freq is kept out of the buffers so `.to(bf16)` never rounds it.

    M-RoPE (config.mrope_section = (a, b, c), Qwen2-VL): positions [3, B, S] (t, h, w axes); the first a
    frequencies rotate by the t position, the next b by h, the last c by w (transformers'
    `apply_multimodal_rotary_pos_emb`). [B, S] positions are used on all three axes."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self._inv_freq = rope_inv_freq(config)
        self._axis = None  # M-RoPE: which position axis (0, 1, 2) drives each frequency [head_dim/2]
        if config.mrope_section is not None:
            self._axis = torch.repeat_interleave(torch.arange(3), torch.tensor(config.mrope_section))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] (or [3, B, S] with M-RoPE) -> (cos, sin), each [B, S, head_dim] in `dtype`."""
        if self._inv_freq.device != position_ids.device:  # moved once, not per call (CUDA-graph capture)
            self._inv_freq = self._inv_freq.to(position_ids.device)
            self._axis = None if self._axis is None else self._axis.to(position_ids.device)
        if position_ids.dim() == 3 and self._axis is None:
            raise ValueError(f"position_ids of shape {tuple(position_ids.shape)} (3 axes) need an M-RoPE model "
                             f"(config.mrope_section); this model takes [B, S]")
        if position_ids.dim() == 2:  # plain RoPE, or M-RoPE with the three axes equal (text)
            freqs = position_ids[..., None].float() * self._inv_freq  # [B, S, head_dim/2]
        else:
            # [B, S, head_dim/2]: frequency j rotates by the position on axis _axis[j]
            freqs = position_ids.permute(1, 2, 0)[..., self._axis].float() * self._inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, head_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, S, head_dim] by cos/sin [B, S, head_dim] (rotate-half convention)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
