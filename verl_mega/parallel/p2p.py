"""Point-to-point transfers between consecutive pipeline stages (activations forward, grads backward).

Every transfer carries a tiny shape header first (dtype code, ndim, dims), so sequence lengths and
micro-batch sizes may change from one transfer to the next: a packed micro-batch sends [1, T, H] with T
its own token count (trainer/packing.py), and under sequence parallelism each TP rank sends its
sequence shard [B, S/tp, H] to the same TP rank of the next stage. An exchange runs in two phases, each
one `batch_isend_irecv` of all its sends and receives: headers, then (after allocating from the
received headers) payloads. Batching is what keeps the 1F1B steady state deadlock-free on NCCL
(stage s sends an activation to s+1 while s+1 sends a gradient to s; unbatched, two large sends
would wait on each other), as in Megatron. It relies on the schedule pairing its calls: whenever
stage s calls `send_forward_recv_backward`, stage s+1 calls `send_backward_recv_forward`, and a
plain send meets a plain receive (the 1F1B order guarantees it).

Timeouts: on gloo every wait is bounded by the group timeout ($VERL_MEGA_DIST_TIMEOUT) and a
failure (timeout, or the peer's socket closing because it died) raises `PipelineCommError` naming
the peer's global rank. On NCCL waits are stream waits; the NCCL watchdog enforces the group timeout
and tears the process down (TORCH_NCCL_ASYNC_ERROR_HANDLING), so no rank hangs silently either.

Reference: Megatron-LM `core/pipeline_parallel/p2p_communication.py`; picotron `pipeline_parallel/pp_comms.py`.
Simplification: no tensor-shape caching (the header is one tiny extra message per transfer).
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from verl_mega.parallel.dist import default_timeout_s

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.bool)
_MAX_DIMS = 6
_HEADER_LEN = 2 + _MAX_DIMS  # [dtype code, ndim, dim_0 .. dim_5]


class PipelineCommError(RuntimeError):
    """A pipeline send/receive failed: the peer died, or did not answer within the timeout."""


class PipeComm:
    """Send/receive between this rank's pipeline neighbours over `layout.pp_group` (global ranks)."""

    def __init__(self, layout, device: torch.device, timeout_s: float | None = None):
        self.group = layout.pp_group
        self.prev_rank = layout.prev_stage_rank
        self.next_rank = layout.next_stage_rank
        self.last_rank = layout.last_stage_rank
        self.device = device
        self.timeout_s = timeout_s if timeout_s is not None else default_timeout_s()
        self._gloo = dist.get_backend(self.group) == "gloo"
        if not self._gloo and self.group.size() > 1:
            # batched p2p on NCCL uses the group's collective communicator: create it now, collectively,
            # rather than lazily at a first send that only two of the stages take part in.
            dist.all_reduce(torch.zeros(1, device=device), group=self.group)

    # ------------------------------------------------------------------ the four schedule operations
    def recv_forward(self, requires_grad: bool = True) -> torch.Tensor | None:
        """Activation from the previous stage (None on the first stage)."""
        if self.prev_rank is None:
            return None
        (x,) = self.exchange(recv_from=[self.prev_rank])
        return x.requires_grad_(requires_grad and x.is_floating_point())

    def send_forward(self, output: torch.Tensor) -> None:
        """Activation to the next stage (no-op on the last stage)."""
        if self.next_rank is not None:
            self.exchange(sends=[(output.detach(), self.next_rank)])

    def recv_backward(self) -> torch.Tensor | None:
        """Gradient w.r.t. this stage's output from the next stage (None on the last stage)."""
        if self.next_rank is None:
            return None
        return self.exchange(recv_from=[self.next_rank])[0]

    def send_backward(self, input_grad: torch.Tensor | None) -> None:
        """Gradient w.r.t. this stage's input to the previous stage (no-op on the first stage)."""
        if self.prev_rank is not None:
            self.exchange(sends=[(input_grad, self.prev_rank)])

    def send_forward_recv_backward(self, output: torch.Tensor) -> torch.Tensor | None:
        """Send the activation forward and receive its gradient back, both posted together."""
        if self.next_rank is None:
            return None
        return self.exchange(sends=[(output.detach(), self.next_rank)], recv_from=[self.next_rank])[0]

    def send_backward_recv_forward(self, input_grad: torch.Tensor | None) -> torch.Tensor | None:
        """Send the input gradient back and receive the next micro-batch's activation, posted together."""
        if self.prev_rank is None:
            return None
        (x,) = self.exchange(sends=[(input_grad, self.prev_rank)], recv_from=[self.prev_rank])
        return x.requires_grad_(x.is_floating_point())

    # ------------------------------------------------------------------ mechanics
    def exchange(self, sends: list[tuple[torch.Tensor, int]] = (), recv_from: list[int] = ()) -> list[torch.Tensor]:
        """Send each (tensor, peer) and receive one tensor from each rank in `recv_from` (global ranks):
        headers in one batch, then payloads in one batch. Returns the received tensors."""
        for tensor, peer in sends:
            if tensor is None:
                raise ValueError(f"pipeline send to rank {peer}: tensor is None (did the stage input get a grad?)")
        payloads = [(tensor.contiguous(), peer) for tensor, peer in sends]
        headers_in = [torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device) for _ in recv_from]
        self._batch([(self._header(t), peer) for t, peer in payloads], list(zip(headers_in, recv_from)), "header")
        received = []
        for header in headers_in:
            code, ndim, *dims = header.tolist()
            received.append(torch.empty(dims[:ndim], dtype=_DTYPES[code], device=self.device))
        self._batch(payloads, list(zip(received, recv_from)), "payload")
        return received

    def _batch(self, sends: list[tuple[torch.Tensor, int]], recvs: list[tuple[torch.Tensor, int]], what: str) -> None:
        """Post all sends and receives as one batch and wait for each (naming its peer on failure)."""
        ops = [dist.P2POp(dist.isend, t, peer=peer, group=self.group) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, peer=peer, group=self.group) for t, peer in recvs]
        if not ops:
            return
        peers = [(peer, f"send {what}") for _, peer in sends] + [(peer, f"receive {what}") for _, peer in recvs]
        works = dist.batch_isend_irecv(ops)
        if len(works) != len(ops):  # coalesced into one work (NCCL): the peers are in the message
            peers = [(", ".join(str(p) for p, _ in peers), f"exchange {what}")] * len(works)
        for work, (peer, desc) in zip(works, peers):
            self._wait(work, peer, desc)

    def _header(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype not in _DTYPES or tensor.dim() > _MAX_DIMS:
            raise ValueError(f"pipeline p2p supports dtypes {_DTYPES} with <= {_MAX_DIMS} dims; "
                             f"got {tensor.dtype} with shape {tuple(tensor.shape)}")
        dims = list(tensor.shape) + [0] * (_MAX_DIMS - tensor.dim())
        return torch.tensor([_DTYPES.index(tensor.dtype), tensor.dim(), *dims], dtype=torch.int64, device=self.device)

    def _wait(self, work, peer: int, what: str) -> None:
        """Wait for `work`; on gloo bounded by the timeout, any failure re-raised naming the peer."""
        try:
            if self._gloo:
                work.wait(datetime.timedelta(seconds=self.timeout_s))
            else:
                work.wait()
        except Exception as exc:  # noqa: BLE001 - re-raised with the peer named
            raise PipelineCommError(
                f"pipeline {what} with rank {peer} (from rank {dist.get_rank()}) failed: the peer died or did "
                f"not answer within {self.timeout_s:.0f} s (VERL_MEGA_DIST_TIMEOUT): {exc}") from exc


def broadcast_tensor_dicts(items: list[dict[str, torch.Tensor]] | None, src: int, group, device: torch.device
                           ) -> list[dict[str, torch.Tensor]]:
    """Broadcast a list of {name: tensor} dicts from global rank `src` to every rank of `group`.

    Only `src` passes `items`; the others get the structure (names, shapes, dtypes) through one
    small object broadcast, then the tensors through one flat broadcast per dtype.
    """
    if group.size() == 1:
        return items
    is_src = dist.get_rank() == src
    meta = [[[(k, tuple(v.shape), v.dtype) for k, v in d.items()] for d in items] if is_src else None]
    dist.broadcast_object_list(meta, src=src, group=group, device=device)
    meta = meta[0]
    by_dtype: dict[torch.dtype, list[int]] = {}
    for d in meta:
        for _, shape, dtype in d:
            by_dtype.setdefault(dtype, []).append(int(torch.Size(shape).numel()))
    flats = {}
    for dtype, sizes in by_dtype.items():
        if is_src:
            flat = torch.cat([v.detach().reshape(-1).to(device) for d in items for v in d.values() if v.dtype == dtype])
        else:
            flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        dist.broadcast(flat, src=src, group=group)
        flats[dtype] = iter(flat.split(sizes))
    if is_src:
        return items
    return [{k: next(flats[dtype]).view(shape) for k, shape, dtype in d} for d in meta]
