"""Packed micro-batches and token-budget batching for the training-side passes.

Packing ("remove padding"): the valid tokens of a micro-batch's rows are concatenated into one row
[1, T] (T = sum of the lengths), positions restart at 0 per sequence and `cu_seqlens` [N + 1] marks
the boundaries, so the decoder's varlen attention keeps each sequence to itself and no FLOP is spent
on padding. Response-level tensors ([b, R]: responses, response_mask, old log-probs, advantages ...)
stay as they are: the loss code keeps its [row, response token] interface, and `response_index` says
which packed position predicts each valid response token (`unpack_responses` scatters a flat
per-token result back to [b, R], zeros at padding).

Token budget: rows are grouped into micro-batches of at most `max_tokens` valid tokens (first-fit
decreasing on the lengths, so the groups are few and full); a row longer than the budget gets a
micro-batch of its own. `balanced_partition` splits rows over data-parallel ranks with nearly equal
token counts (greedy longest-first: any two ranks differ by at most one sequence's length);
`balance_over_dp` re-deals the rows themselves and `redeal_images` sends the re-dealt rows' images
(vision-language models) from the ranks that own them to the ranks that now hold the rows.

Neither changes a number: the engine divides every loss by the global token count, whatever the split.
Reference: verl's `rmpad` / `get_seqlen_balanced_partitions`, OpenRLHF packing_samples.
"""

from __future__ import annotations

import heapq

import torch
import torch.distributed as dist
import torch.nn.functional as F

# micro-batch keys the model reads on the host (packed boundaries, the vision tower's grids): they stay there, so
# reading them needs no device round trip
HOST_KEYS = ("cu_seqlens", "image_grid_thw")


def microbatch_to(mb: dict, device: torch.device) -> dict:
    """The micro-batch with every tensor on `device` except HOST_KEYS; other values as they are."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) and k not in HOST_KEYS else v for k, v in mb.items()}


def pack_microbatch(mb: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A padded micro-batch -> the same micro-batch packed into one row.

    mb needs attention_mask [b, S] (1 = token; the valid tokens of a row are contiguous: left-padded
    prompt, right-padded response). Every tensor of shape [b, S] (input_ids, position_ids, labels,
    loss_mask ...) becomes [1, T] holding the valid positions; position_ids are recomputed (0 at each
    sequence start), except 3-axis M-RoPE position_ids [3, b, S] (counted over the valid tokens already),
    which keep their valid positions -> [3, 1, T]. Added: cu_seqlens [b + 1] int32; with `responses` [b, R]
    (the last R columns), response_index [n] long: the packed position whose hidden state predicts each
    valid response token (row-major over response_mask), and response_slot [n] long: that token's place in the
    flattened [b * R] (indices found here, on the host, so the passes index without a sync). attention_mask is
    dropped; other tensors are kept as they are.
    """
    mask = mb["attention_mask"].bool()  # [b, S]
    lengths = mask.sum(-1)
    cu_seqlens = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)  # [b + 1]
    out = {k: v for k, v in mb.items() if k != "attention_mask" and tuple(v.shape) != tuple(mask.shape)}
    for k, v in mb.items():
        if k != "attention_mask" and tuple(v.shape) == tuple(mask.shape):
            out[k] = v[mask][None]  # [1, T]
    packed_pos = mask.long().cumsum(-1) - 1 + cu_seqlens[:-1, None].long()  # [b, S] packed index of each column
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)  # [T]
    out["position_ids"] = (torch.arange(int(lengths.sum()), device=mask.device) - starts)[None]  # [1, T]
    if "position_ids" in mb and mb["position_ids"].dim() == 3:
        out["position_ids"] = mb["position_ids"][:, mask][:, None]  # [3, 1, T]
    out["cu_seqlens"] = cu_seqlens
    if "responses" in mb:
        r = mb["responses"].shape[1]
        resp_mask = mb["response_mask"].bool()  # [b, R]
        out["response_index"] = (packed_pos[:, -r:] - 1)[resp_mask]  # [n] predicted by the previous position
        out["response_slot"] = resp_mask.reshape(-1).nonzero().squeeze(1)  # [n] row-major places in [b * R]
    return out


def unpack_responses(flat: torch.Tensor, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """flat [n] per valid response token (order of `response_index`) -> [b, R], 0 at padding (differentiable).

    A scatter to `response_slot`, not a masked_scatter: a boolean mask makes the GPU count its ones before
    anything can be queued after it (a host sync), in the forward and again in the backward."""
    b, r = mb["response_mask"].shape
    return flat.new_zeros(b * r).scatter(0, mb["response_slot"].to(flat.device), flat).view(b, r)


def token_budget_groups(lengths: list[int], max_tokens: int) -> tuple[list[list[int]], int]:
    """Indices into `lengths` grouped into micro-batches of at most `max_tokens` tokens each.

    First-fit decreasing: longest first, each into the first group with room. A length above the budget
    gets a group of its own. Returns (groups, number of such oversized sequences). Groups come out
    longest-first; each group lists its indices in ascending order.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_micro_batch must be >= 1, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    room: list[int] = []
    oversized = 0
    for i in order:
        n = lengths[i]
        if n > max_tokens:
            groups.append([i])
            room.append(0)
            oversized += 1
            continue
        for g, free in enumerate(room):
            if free >= n:
                groups[g].append(i)
                room[g] -= n
                break
        else:
            groups.append([i])
            room.append(max_tokens - n)
    return [sorted(g) for g in groups], oversized


def balanced_partition(lengths: list[int], parts: int) -> list[list[int]]:
    """Indices into `lengths` split into `parts` lists with nearly equal sums (greedy longest-first:
    each length goes to the currently lightest part, so any two sums differ by at most max(lengths))."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    heap = [(0, p) for p in range(parts)]
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        load, p = heapq.heappop(heap)
        out[p].append(i)
        heapq.heappush(heap, (load + lengths[i], p))
    return [sorted(p) for p in out]


def balance_over_dp(tensors: dict[str, torch.Tensor], prompt_len: int, dp_group
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Re-deal the rows of every data-parallel rank so that each rank gets nearly the same number of tokens.

    tensors: this rank's rows, sequence tensors [n, P + R] (left-padded prompt | right-padded response,
    `prompt_len` = P, "attention_mask" among them) and response tensors [n, R]; every rank passes the
    same keys. All ranks' rows are gathered (re-padded to the widest prompt and response), split with
    `balanced_partition` on their valid lengths (any two ranks within one sequence's length) and this
    rank keeps its part. Returns (its tensors, their global row ids [m] = source dp rank * 2**32 + row).
    Collective over `dp_group`; the same on every tp/pp rank of a replica.
    """
    n, s = tensors["attention_mask"].shape
    local = {k: v.detach().cpu() for k, v in tensors.items()}
    gathered: list = [None] * dist.get_world_size(dp_group)
    dist.all_gather_object(gathered, (prompt_len, s, local), group=dp_group)
    p_max = max(p for p, _, _ in gathered)
    r_max = max(width - p for p, width, _ in gathered)
    parts, ids = [], []
    for src, (p, width, rows) in enumerate(gathered):
        parts.append({k: F.pad(v, (p_max - p, r_max - (width - p))) if v.shape[1] == width else
                      F.pad(v, (0, r_max - v.shape[1])) for k, v in rows.items()})
        count = rows["attention_mask"].shape[0]
        ids.append(src * 2**32 + torch.arange(count))
    full = {k: torch.cat([part[k] for part in parts]) for k in local}
    global_ids = torch.cat(ids)
    lengths = full["attention_mask"].sum(-1).tolist()
    mine = torch.tensor(balanced_partition(lengths, len(gathered))[dist.get_rank(dp_group)], dtype=torch.long)
    return {k: v[mine] for k, v in full.items()}, global_ids[mine]


def gather_to_owners(values: torch.Tensor, global_ids: torch.Tensor, dp_group) -> torch.Tensor:
    """Inverse of `balance_over_dp` for per-row results: values [m, ...] of the rows with `global_ids`
    (computed on whichever rank held them) -> this rank's own rows [n, ...] in their original order."""
    gathered: list = [None] * dist.get_world_size(dp_group)
    dist.all_gather_object(gathered, (global_ids.cpu(), values.detach().cpu()), group=dp_group)
    me = dist.get_rank(dp_group)
    ids = torch.cat([g[0] for g in gathered])
    vals = torch.cat([g[1] for g in gathered])
    keep = (ids >> 32) == me
    return vals[keep][torch.argsort(ids[keep])]


def redeal_images(images: dict[int, tuple[torch.Tensor, torch.Tensor]], row_keys: list[int],
                  global_ids: torch.Tensor, dp_group) -> tuple[list[int], dict[int, tuple[torch.Tensor, torch.Tensor]]]:
    """The images that the rows `global_ids` (this rank's part after `balance_over_dp`) need, brought from
    the data-parallel ranks that own them; only those images move, each once per receiving rank.

    images: this rank's images by key (e.g. prompt index): key -> (pixel_values [N_patches, D],
    image_grid_thw [N_images, 3]), keys >= 0; row_keys: the key of each of this rank's rows as passed to
    `balance_over_dp` (a key absent from `images`: a row without images). Returns (the key of each row
    of global_ids [m] as a global key = owner dp rank * 2**32 + key, {global key: its images} for every
    such key with images). The images' shapes travel as metadata (all_gather_object); the pixels go
    point-to-point, one message per (owner, receiver) pair (CUDA tensors under NCCL). Collective over
    `dp_group` (its timeout bounds the waits); the same on every tp/pp rank of a replica.
    """
    world, me = dist.get_world_size(dp_group), dist.get_rank(dp_group)
    shapes = {k: (grid.reshape(-1, 3).cpu(), pv.shape[1], pv.dtype) for k, (pv, grid) in images.items()}
    meta: list = [None] * world
    dist.all_gather_object(meta, (list(row_keys), shapes, global_ids.cpu().tolist()), group=dp_group)

    def key_of(gid: int) -> tuple[int, int]:
        """(owner rank, key) of the row with global id `gid`."""
        return gid >> 32, meta[gid >> 32][0][gid & (2**32 - 1)]

    # per rank: the (owner, key) of the images its rows need, sorted (the same order on sender and receiver)
    needs = [sorted({key_of(gid) for gid in m[2] if key_of(gid)[1] in meta[key_of(gid)[0]][1]}) for m in meta]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(dp_group) == "nccl" \
        else torch.device("cpu")
    ops, received = [], []
    for peer in range(world):
        send = [k for src, k in needs[peer] if src == me]
        if peer != me and send:
            buf = torch.cat([images[k][0] for k in send]).to(device, images[send[0]][0].dtype)
            ops.append(dist.P2POp(dist.isend, buf, dist.get_global_rank(dp_group, peer), dp_group))
        recv = [k for src, k in needs[me] if src == peer]
        if peer != me and recv:
            grids = [meta[peer][1][k][0] for k in recv]
            _, width, dtype = meta[peer][1][recv[0]]
            buf = torch.empty(int(sum(g.prod(-1).sum() for g in grids)), width, dtype=dtype, device=device)
            ops.append(dist.P2POp(dist.irecv, buf, dist.get_global_rank(dp_group, peer), dp_group))
            received.append((peer, recv, grids, buf))
    for work in dist.batch_isend_irecv(ops) if ops else []:
        work.wait()
    out = {me * 2**32 + k: images[k] for src, k in needs[me] if src == me}
    for peer, keys, grids, buf in received:
        for key, grid, pv in zip(keys, grids, buf.cpu().split([int(g.prod(-1).sum()) for g in grids])):
            out[peer * 2**32 + key] = (pv, grid)
    return [src * 2**32 + key for src, key in map(key_of, global_ids.tolist())], out
