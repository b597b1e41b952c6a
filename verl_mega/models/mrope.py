"""M-RoPE position ids of Qwen2-VL / Qwen2.5-VL: three position axes (temporal, height, width) per token.

Text tokens advance all three axes together (t = h = w = running index). The merged tokens of an
image with patch grid (T, H, W) and merge size m take t = start + frame, h = start + row, w = start +
column on its (T, H/m, W/m) grid (row-major), and the next text token starts at start + max(H, W)/m.
A sequence's `delta` = (largest position + 1) - (number of real tokens): a decode step at token
index n (pads excluded) has position n + delta on all three axes.

Follows transformers' `Qwen2_5_VLModel.get_rope_index` for images (videos, whose temporal axis is
scaled by `tokens_per_second`, are not supported). Left padding: pad positions get 0 and are skipped.
An image is a maximal run of `image_token_id` tokens (transformers' `mm_token_type_ids` groups);
consecutive images must be separated by other tokens (the processor writes `<|vision_start|>` /
`<|vision_end|>` around each). Generated responses must not be fed through it as if they were
prompts (a sampled image token would open an "image"): continue a prompt's positions with
`decode_position_ids` (or prompt positions + 1, 2, ... + delta).
"""

from __future__ import annotations

import torch


def mrope_position_ids(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                       attention_mask: torch.Tensor | None = None, *, image_token_id: int,
                       vision_start_token_id: int | None = None, spatial_merge_size: int,
                       video_grid_thw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """3-axis positions of a batch: (position_ids [3, B, S] long, deltas [B] long).

    input_ids [B, S]; image_grid_thw [N, 3] (T, H, W in patches) of the batch's images in row-major
    order of their placeholder runs; attention_mask [B, S] 1/0 (left padding; None = no padding).
    `vision_start_token_id` (optional): every image run must follow this token (as the processor
    writes it). A text-only row gets the positions of `position_ids_from_mask` on all three axes and
    delta 0. Raises ValueError when the image runs do not match `image_grid_thw` (count or size) or
    lack their vision-start token, NotImplementedError for videos.
    """
    if video_grid_thw is not None:
        raise NotImplementedError("mrope_position_ids: videos (video_grid_thw) are not supported, only images")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(input_ids.shape)}")
    b, s = input_ids.shape
    # computed on the host and returned on input_ids' device: the per-row loop reads values (runs, boolean
    # masks), which on a GPU would be a device sync each
    device, input_ids = input_ids.device, input_ids.cpu()
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    grids = [] if image_grid_thw is None else [tuple(int(x) for x in g) for g in image_grid_thw.tolist()]
    position_ids = torch.zeros(3, b, s, dtype=torch.long)
    deltas = torch.zeros(b, dtype=torch.long)
    next_image = 0
    for row in range(b):
        ids = input_ids[row][mask[row]]  # [real tokens]
        pieces, pos = [], 0
        for start, end, is_image in _runs(ids == image_token_id):
            if not is_image:
                pieces.append(torch.arange(pos, pos + end - start).expand(3, -1))
                pos += end - start
                continue
            if vision_start_token_id is not None and (start == 0 or ids[start - 1] != vision_start_token_id):
                raise ValueError(f"input_ids row {row}: an image run at real token {start} does not follow the "
                                 f"vision-start token {vision_start_token_id}")
            if next_image >= len(grids):
                raise ValueError(f"input_ids row {row} has more image placeholder runs than image_grid_thw "
                                 f"has rows ({len(grids)})")
            t, h, w = grids[next_image]
            next_image += 1
            piece = _image_positions(t, h // spatial_merge_size, w // spatial_merge_size, pos)
            if piece.shape[1] != end - start:
                raise ValueError(f"input_ids row {row}: an image run of {end - start} placeholder tokens does not "
                                 f"match its image_grid_thw {[t, h, w]} ({piece.shape[1]} tokens after the "
                                 f"{spatial_merge_size}x{spatial_merge_size} merge)")
            pieces.append(piece)
            pos += max(h, w) // spatial_merge_size
        if not pieces:
            continue
        positions = torch.cat(pieces, dim=1)  # [3, real tokens]
        position_ids[:, row, mask[row]] = positions
        deltas[row] = positions.max() + 1 - positions.shape[1]
    if next_image != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} rows but input_ids hold {next_image} image runs")
    return position_ids.to(device), deltas.to(device)


def _runs(flags: torch.Tensor) -> list[tuple[int, int, bool]]:
    """Maximal runs of equal values of a host bool vector: [(start, end, value)]."""
    if flags.numel() == 0:
        return []
    cuts = (torch.nonzero(flags[1:] != flags[:-1]).flatten() + 1).tolist()
    bounds = [0] + cuts + [flags.numel()]
    values = flags[bounds[:-1]].tolist()
    return [(a, e, v) for a, e, v in zip(bounds[:-1], bounds[1:], values)]


def _image_positions(t: int, h: int, w: int, start: int) -> torch.Tensor:
    """[3, t*h*w] positions of an image's merged tokens: (frame, row, column) + start, row-major."""
    grid = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"))  # [3,t,h,w]
    return grid.reshape(3, -1) + start


def decode_position_ids(attention_mask: torch.Tensor, deltas: torch.Tensor, num_new: int = 1) -> torch.Tensor:
    """Positions [3, B, num_new] of the last `num_new` tokens of a decode step: (their index among the
    real tokens of attention_mask [B, S_kv]) + deltas [B] on all three axes."""
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -num_new:]  # [batch, new]
    return (pos + deltas.to(pos.device)[:, None]).unsqueeze(0).expand(3, -1, -1)
