"""The one collective resharding needs: all-gather of equal flat chunks into one buffer.

NCCL: `all_gather_single` (torch ≥ 2.13; `all_gather_into_tensor` before), in place when the input
is this rank's chunk of the output (NCCL and gloo both accept the aliasing). Other backends (gloo,
whose single-tensor all-gather is missing on older torch) use the list form with the output
chunks as views, so no extra copy is made either way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_flat(out: torch.Tensor, chunk: torch.Tensor, group: dist.ProcessGroup, async_op: bool = False):
    """Gather every rank's `chunk` [n] into `out` [group_size * n] (rank-major) over `group`.

    `chunk` may be `out`'s own slice (in-place gather). Returns the work handle if `async_op`
    (call `.wait()` before reading `out`), else None. A group of one rank only copies if needed.
    """
    size = group.size()
    assert out.numel() == size * chunk.numel(), "out must hold one chunk per rank"
    if size == 1:
        if out.data_ptr() != chunk.data_ptr():
            out.copy_(chunk)
        return None
    if dist.get_backend(group) == "nccl":
        return _single(out, chunk, group=group, async_op=async_op)
    return dist.all_gather(list(out.chunk(size)), chunk, group=group, async_op=async_op)


def all_gather_rows(block: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's `block` [rows, ...] along dim 0 over `group` -> [size * rows, ...]."""
    size = group.size()
    out = torch.empty((size * block.shape[0], *block.shape[1:]), dtype=block.dtype, device=block.device)
    all_gather_flat(out.view(-1), block.contiguous().view(-1), group)
    return out
