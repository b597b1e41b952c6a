"""The collectives resharding needs: all-gather of equal flat chunks into one buffer
(`all_gather_flat`, the packed path) and many per-tensor all-gathers issued as one group
(`gather_into`, the direct path).

NCCL: `all_gather_single` (torch ≥ 2.13; `all_gather_into_tensor` before), in place when the input
is this rank's chunk of the output (NCCL and gloo both accept the aliasing); the per-tensor form is
`ProcessGroup.allgather_into_tensor_coalesced` (the C++ call behind `_coalescing_manager`'s
all-gather fast path since torch 2.0: one NCCL group launch, no Python loop per tensor). Other
backends (gloo, whose single-tensor and coalesced all-gathers are missing on older torch) use the
list form with the output chunks as views, so no extra copy is made either way.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from verl_mega.parallel.dist import all_gather_single as _single


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


class Works:
    """Several work handles waited on as one (`wait()`); empty for a group of one rank."""

    def __init__(self, works: list) -> None:
        self.works = [w for w in works if w is not None]

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.works = []


def gather_into(outputs: list[torch.Tensor], inputs: list[torch.Tensor], group: dist.ProcessGroup,
                coalesced: bool | None = None) -> Works:
    """For every i, gather each rank's `inputs[i]` (any shape, n_i elements, equal on all ranks)
    into `outputs[i]` (contiguous, size·n_i elements), rank-major: `outputs[i].view(size, n_i)[m]` is
    rank m's input, i.e. for inputs [rows, ...] the output [size·rows, ...] is their concatenation
    along dim 0. Asynchronous: `.wait()` the returned handle before reading the outputs.

    `coalesced`: one grouped launch (`allgather_into_tensor_coalesced`); None picks it on NCCL and
    the per-tensor list form (`all_gather` into views of the output) elsewhere. Both give the same
    bytes; the list form is what CPU/gloo runs use.
    """
    size = group.size()
    assert len(outputs) == len(inputs), "one output per input"
    flat_in = []
    for out, inp in zip(outputs, inputs):
        assert out.is_contiguous() and out.numel() == size * inp.numel(), "output must hold one input per rank"
        assert out.dtype == inp.dtype, "output and input dtypes differ"
        flat_in.append(inp.reshape(-1) if inp.is_contiguous() else inp.contiguous().view(-1))
    flat_out = [out.view(-1) for out in outputs]
    if size == 1:
        for out, inp in zip(flat_out, flat_in):
            out.copy_(inp)
        return Works([])
    if not outputs:
        return Works([])
    if coalesced is None:
        coalesced = outputs[0].is_cuda and "nccl" in str(dist.get_backend(group))
    grouped = getattr(group, "allgather_into_tensor_coalesced", None) if coalesced else None
    if grouped is not None:
        return Works([grouped(flat_out, flat_in)])
    if coalesced:  # a build without the grouped call: one async single-tensor gather each
        return Works([_single(out, inp, group=group, async_op=True) for out, inp in zip(flat_out, flat_in)])
    return Works([dist.all_gather(list(out.view(size, -1).unbind(0)), inp, group=group, async_op=True)
                  for out, inp in zip(flat_out, flat_in)])


def all_gather_rows(block: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's `block` [rows, ...] along dim 0 over `group` -> [size * rows, ...]."""
    size = group.size()
    out = torch.empty((size * block.shape[0], *block.shape[1:]), dtype=block.dtype, device=block.device)
    all_gather_flat(out.view(-1), block.contiguous().view(-1), group)
    return out
