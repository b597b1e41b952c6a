"""The Qwen2.5-VL vision tower: image patches -> one embedding per merged patch, in the LLM's width.

Follows transformers' `Qwen2_5_VisionTransformerPretrainedModel` numerically (Bai et al. 2025,
"Qwen2.5-VL Technical Report"):
- patch embedding: a Conv3d (kernel = stride = (temporal_patch, patch, patch), no bias) over each
  row of `pixel_values` [N, C*T*P*P] (the processor's flattened patches);
- 2D RoPE: the first half of a head's rotary frequencies rotate by the patch row, the second by its
  column (rotate-half convention, computed in fp32);
- blocks: pre-norm RMSNorm (eps 1e-6), bidirectional attention with fused qkv (bias), SwiGLU MLP
  with biases. Blocks at `fullatt_block_indexes` attend over a whole image (frame); the others over
  windows of window_size x window_size pixels. Patches are reordered once so that every window is
  contiguous (`window_index`; merge units of m x m patches stay together), attention runs through
  `varlen_attention.varlen_attend(causal=False)` with the window / image boundaries as cu_seqlens,
  and the merger's output is put back in the processor's order (`argsort(window_index)`);
- merger: RMSNorm, then each m x m group of patches concatenated -> Linear -> GELU -> Linear into the
  language model's hidden size.

Tensor parallelism: the tower is REPLICATED on every TP rank (plain nn.Linear / nn.Conv3d, no
`tensor_model_parallel` attribute) rather than sharded with megatron's layers. Its input
(`pixel_values`) is the same on every TP rank, so each rank computes the same embeddings; its
gradient is the same too, because the embeddings enter the replicated residual stream and the first
ColumnParallelLinear all-reduces its input gradient over the TP group (with sequence parallelism the
all-gather's backward does the same), so no communication is added and the weights stay in sync.
Why not shard: replication adds no communication and no code (plain torch layers; HF loading and
resharding treat the tower like the decoder's norms), and the tower runs once per image, not per
generated token. Its cost under tp ranks is the redundant share * (1 - 1/tp) of a phase. FLOP estimate
at the Qwen2.5-VL-3B shape (tower ~0.67 B parameters, language model ~3.1 B) with one 448 x 448 image
(1024 patches -> 256 tokens) per sample and ~580-token sequences: forward ~1.3 TFLOP per image vs ~3.6
TFLOP per sequence, so the tower is ~27% of an update micro-batch when every sample re-encodes its
image, but ~4% when the n = 8 samples of a prompt share one encoding (`image_embeds`: encode the
distinct images once, repeat the rows; autograd sums the copies' gradients), and a few percent of
a rollout (prefill only, decoding dominates). Sharing the encoding is therefore the first lever,
sharding the second: `benchmarks/vlm_vision_share.py` measures both shares on the GPU (run by the
integrator; no GPU figure from this branch). If the measured share stays large, sharding the blocks
with the decoder's column/row layers (qkv/gate/up column-split, proj/down row-split) is the known
next step.

Deliberate simplifications: images only (a video's temporal axis needs `second_per_grid_ts`); the
vision blocks run in the parameters' dtype with RoPE in fp32, as transformers does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from verl_mega.models.config import VisionConfig
from verl_mega.models.norm import RMSNorm
from verl_mega.models.varlen_attention import PackedSeqs, varlen_attend

VISION_NORM_EPS = 1e-6  # transformers hard-codes the vision RMSNorm epsilon


class PatchEmbed(nn.Module):
    """Conv3d patch embedding: pixel_values [N, C*T*P*P] -> [N, hidden] (HF `visual.patch_embed`)."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype, device=None):
        super().__init__()
        self.shape = (config.in_channels, config.temporal_patch_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=self.shape[1:],
                              stride=self.shape[1:], bias=False, dtype=dtype, device=device)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.view(-1, *self.shape).to(self.proj.weight.dtype)  # [N, C, T, P, P]
        return self.proj(x).view(x.shape[0], -1)  # [N, hidden]


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention inside each packed segment (window or image); fused qkv."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype, device=None):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True, dtype=dtype, device=device)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True, dtype=dtype, device=device)
        self.varlen_kernel = "auto"  # see varlen_attention.py

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
        """x [N, hidden], cos/sin [N, head_dim] (fp32) -> [N, hidden]."""
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # [N, heads, head_dim] each
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, heads, N, head_dim]
        out = varlen_attend(q, k, v, seqs, self.varlen_kernel, causal=False)  # [1, N, heads*head_dim]
        return self.proj(out[0])


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, heads, D] by cos/sin [N, D] in fp32 (rotate-half), back to x's dtype."""
    x32, cos, sin = x.float(), cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class VisionMLP(nn.Module):
    """SwiGLU with biases: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype, device=None):
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=True, dtype=dtype, device=device)
        self.up_proj = nn.Linear(h, i, bias=True, dtype=dtype, device=device)
        self.down_proj = nn.Linear(i, h, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype, device=None):
        super().__init__()
        self.norm1 = RMSNorm(config.hidden_size, VISION_NORM_EPS, dtype, device)
        self.norm2 = RMSNorm(config.hidden_size, VISION_NORM_EPS, dtype, device)
        self.attn = VisionAttention(config, dtype, device)
        self.mlp = VisionMLP(config, dtype, device)

    def forward(self, x, cos, sin, seqs: PackedSeqs) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, seqs)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm, then each group of m*m consecutive patches -> Linear -> GELU -> Linear (HF `visual.merger`)."""

    def __init__(self, config: VisionConfig, dtype: torch.dtype, device=None):
        super().__init__()
        width = config.hidden_size * config.spatial_merge_size ** 2
        self.ln_q = RMSNorm(config.hidden_size, VISION_NORM_EPS, dtype, device)
        self.mlp = nn.Sequential(nn.Linear(width, width, dtype=dtype, device=device), nn.GELU(),
                                 nn.Linear(width, config.out_hidden_size, dtype=dtype, device=device))
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.width))  # [N / m^2, out_hidden]


class VisionTower(nn.Module):
    """The whole vision encoder; parameter names are those of HF's `visual.*` (without the prefix)."""

    def __init__(self, config: VisionConfig, params_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config, params_dtype, device)
        self.blocks = nn.ModuleList(VisionBlock(config, params_dtype, device) for _ in range(config.depth))
        self.merger = PatchMerger(config, params_dtype, device)
        rot = config.head_dim // 2  # rotary dims per axis (h, w), as HF's axial RoPE
        self._inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, rot, 2, dtype=torch.float) / rot))

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, C*T*P*P] (the images' patches, concatenated), image_grid_thw [I, 3] (T, H, W in
        patches; N = sum T*H*W) -> embeddings [N / m^2, out_hidden] in the processor's order."""
        grids = check_grids(pixel_values, image_grid_thw, self.config)  # a host read if the grid is on the GPU
        device = pixel_values.device
        if not grids:  # a micro-batch without images (pixel_values [0, C*T*P*P])
            return torch.zeros(0, self.config.out_hidden_size, dtype=self.patch_embed.proj.weight.dtype, device=device)
        m2 = self.config.spatial_merge_size ** 2
        # index tensors are built on the host from `grids` and copied to the device once each (no device ->
        # host reads: PackedSeqs' Python lengths come from the host copies)
        window_index, cu_windows = window_partition(grids, self.config)
        restore = torch.argsort(window_index).to(device)  # window order -> processor order
        window_index = window_index.to(device)
        cu_images = torch.tensor([0] + [h * w for t, h, w in grids for _ in range(t)]).cumsum(0)
        windows, images = (PackedSeqs.from_cu_seqlens(cu, device) for cu in (cu_windows, cu_images))

        def to_windows(x: torch.Tensor) -> torch.Tensor:  # [N, ...] -> window-contiguous order, m*m units kept
            return x.view(-1, m2, *x.shape[1:])[window_index].view(x.shape)

        hidden = to_windows(self.patch_embed(pixel_values))  # [N, hidden]
        cos, sin = (to_windows(t) for t in self._rope_tables(grids, device))  # [N, head_dim] fp32
        full = set(self.config.fullatt_block_indexes)
        for i, block in enumerate(self.blocks):
            hidden = block(hidden, cos, sin, images if i in full else windows)
        return self.merger(hidden)[restore]  # [N / m^2, out_hidden]

    def _rope_tables(self, grids: list[tuple[int, int, int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [N, head_dim] (fp32) of every patch in processor order: (row freqs, column freqs) x 2."""
        pos = patch_positions(grids, self.config.spatial_merge_size).to(device)  # [N, 2]
        if self._inv_freq.device != device:  # kept out of the buffers so `.to(bf16)` never rounds it
            self._inv_freq = self._inv_freq.to(device)
        freqs = pos[..., None].float() * self._inv_freq  # [N, 2, head_dim/4]
        freqs = freqs.flatten(1)  # [N, head_dim/2]: row frequencies then column frequencies
        emb = torch.cat((freqs, freqs), dim=-1)  # [N, head_dim]
        return emb.cos(), emb.sin()


def image_token_counts(image_grid_thw: torch.Tensor, spatial_merge_size: int) -> list[int]:
    """Placeholder tokens (= rows of the tower's output) of each image: T*H*W / m^2 per row of image_grid_thw
    [N_images, 3]; e.g. to split `encode_images` output per image and repeat it for n samples."""
    return [t * h * w // spatial_merge_size ** 2 for t, h, w in image_grid_thw.tolist()]


def check_grids(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                config: VisionConfig) -> list[tuple[int, int, int]]:
    """image_grid_thw as a list of (T, H, W); ValueError naming the input when it does not fit."""
    if image_grid_thw is None or image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3:
        shape = None if image_grid_thw is None else tuple(image_grid_thw.shape)
        raise ValueError(f"image_grid_thw must be [num_images, 3] (T, H, W in patches), got {shape}")
    grids = [tuple(int(x) for x in g) for g in image_grid_thw.tolist()]
    m = config.spatial_merge_size
    bad = [g for g in grids if g[1] % m or g[2] % m or min(g) < 1]
    if bad:
        raise ValueError(f"image_grid_thw rows {bad}: H and W must be positive multiples of spatial_merge_size={m}")
    width = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
    total = sum(t * h * w for t, h, w in grids)
    if pixel_values.dim() != 2 or tuple(pixel_values.shape) != (total, width):
        raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)}, image_grid_thw {grids} needs "
                         f"({total}, {width})")
    return grids


def patch_positions(grids: list[tuple[int, int, int]], merge: int) -> torch.Tensor:
    """(row, column) [N, 2] of every patch in the processor's order: m x m merge blocks row-major, patches
    row-major inside a block, frames one after another (HF `get_vision_position_ids`)."""
    out = []
    for t, h, w in grids:
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        rows, cols = (x.reshape(block).transpose(1, 2).flatten() for x in (rows, cols))
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out)


def window_partition(grids: list[tuple[int, int, int]], config: VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(window_index [N / m^2] long, cu_window_seqlens [W + 1] int32) (HF `get_vision_window_index`).

    Merge units (m x m patches) of each frame are tiled by windows of `window_size // (m * patch)` units
    per side (edge windows smaller); window_index lists the units window by window, cu_window_seqlens
    the windows' boundaries in patches."""
    m = config.spatial_merge_size
    side = config.window_size // m // config.patch_size  # window side in merge units
    index, cu, offset = [], [0], 0
    for t, h, w in grids:
        gh, gw = h // m, w // m
        units = torch.arange(t * gh * gw).reshape(t, gh, gw)
        pad_h, pad_w = -gh % side, -gw % side
        padded = F.pad(units, (0, pad_w, 0, pad_h), value=-1)  # [t, gh', gw']
        nh, nw = (gh + pad_h) // side, (gw + pad_w) // side
        tiles = padded.reshape(t, nh, side, nw, side).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, side * side)
        keep = tiles >= 0
        index.append(tiles[keep] + offset)
        for n in keep.sum(1).tolist():
            if n:
                cu.append(cu[-1] + n * m * m)
        offset += t * gh * gw
    return torch.cat(index), torch.tensor(cu, dtype=torch.int32)
