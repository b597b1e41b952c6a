"""Host (CPU) offload primitives: pinned host copies, a streamed host optimizer step, storage stashing,
and layer-by-layer weight streaming.

- `host_empty` / `host_copy`: host tensors, pinned when the device is CUDA (pinned memory is what
  makes `non_blocking` copies asynchronous).
- `StreamedHostStep`: an optimizer step over host fp32 masters, bucket by bucket: gradients down,
  CPU step, updated weights up, double-buffered so copies overlap the CPU work.
- `StorageStash`: moves tensors' data to the host and frees their device storage *in place*
  (`untyped_storage().resize_(0)`), so every view of them (`main_grad`, bucket views, optimizer
  state) stays valid; `restore()` re-allocates and copies back. Used for the rollout/train hand-over.
- `LayerStreamer`: keeps a module list's parameters on the host and brings one layer at a time to
  the device around its forward (the next layer is prefetched on a side stream), for frozen models
  (the reference policy) that only run forward.

Reference: DeepSpeed ZeRO-Offload (Ren et al., USENIX ATC 2021): fp32 state and the Adam step on
the CPU; FSDP's storage-resize trick for freeing parameters in place. Deliberate difference: the
gradients go to the host at the step, bucket by bucket, not during backward. A full host copy of
the gradients (4 B/param: 28 GiB at 7B) would not fit next to the masters and moments (12 B/param:
85 GiB) in a 128 GiB host, and clipping needs the global norm first; the copies overlap the CPU
step instead, and clipping scales the device gradients (one GPU kernel).
"""

from __future__ import annotations

import torch


def host_empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty host tensor, pinned when `device` (where it will be copied to/from) is CUDA."""
    return torch.empty(shape, dtype=dtype, pin_memory=torch.device(device).type == "cuda")


def host_copy(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host copy of `t` (pinned when `t` is on CUDA), optionally converted to `dtype`."""
    out = host_empty(t.shape, dtype or t.dtype, t.device)
    out.copy_(t)
    return out


class StreamedHostStep:
    """An optimizer step over host fp32 masters, streamed bucket by bucket through pinned staging buffers.

    For bucket k (owned parameters in order, about `bucket_numel` elements, a larger parameter alone):
    its fp32 device gradients are copied into a pinned staging buffer (side stream, non_blocking),
    the optimizer steps the bucket's masters on the CPU (the optimizer skips masters whose .grad is
    None, so only this bucket moves), the updated masters are converted to the parameter dtype in a
    second pinned buffer and copied back into the device parameters (non_blocking). Two buffers of
    each kind and a stream per direction: bucket k+1's gradient copy overlaps bucket k's CPU step,
    and bucket k's upload overlaps bucket k+1's step and download. Host memory beyond masters and
    moments: 2 x bucket x (4 + param bytes). On CPU the same loop runs with plain copies.
    """

    def __init__(self, params: list[torch.Tensor], masters: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                 bucket_numel: int):
        if bucket_numel < 1:
            raise ValueError(f"bucket_numel must be >= 1, got {bucket_numel}")
        self.params, self.masters, self.optimizer = params, masters, optimizer
        self.buckets: list[list[int]] = []
        size = 0
        for i, p in enumerate(params):
            if not self.buckets or size + p.numel() > bucket_numel:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(i)
            size += p.numel()
        largest = max((sum(params[i].numel() for i in b) for b in self.buckets), default=0)
        device = params[0].device if params else torch.device("cpu")
        dtype = params[0].dtype if params else torch.float32
        self.cuda = device.type == "cuda"
        self.device = device
        self.grad_stage = [host_empty(largest, torch.float32, device) for _ in range(2)]
        self.param_stage = [host_empty(largest, dtype, device) for _ in range(2)]
        # one stream per direction: bucket k+1's download and bucket k's upload can overlap on PCIe
        self.down = torch.cuda.Stream(device) if self.cuda else None
        self.up = torch.cuda.Stream(device) if self.cuda else None
        self._grad_ready = [None, None]
        self._upload_done = [None, None]

    def _views(self, buf: torch.Tensor, k: int) -> list[torch.Tensor]:
        out, offset = [], 0
        for i in self.buckets[k]:
            n = self.params[i].numel()
            out.append(buf[offset:offset + n].view(self.params[i].shape))
            offset += n
        return out

    def _fetch(self, k: int, grads: list[torch.Tensor]) -> None:
        """Start copying bucket k's device gradients into grad_stage[k % 2]."""
        if k >= len(self.buckets):
            return
        views = self._views(self.grad_stage[k % 2], k)
        if not self.cuda:
            for v, i in zip(views, self.buckets[k]):
                v.copy_(grads[i])
            return
        self.down.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.down):
            for v, i in zip(views, self.buckets[k]):
                v.copy_(grads[i], non_blocking=True)
            self._grad_ready[k % 2] = torch.cuda.Event()
            self._grad_ready[k % 2].record(self.down)

    def _upload(self, k: int) -> None:
        """Convert bucket k's masters to the parameter dtype (pinned) and copy them into the parameters."""
        slot = k % 2
        if self._upload_done[slot] is not None:
            self._upload_done[slot].synchronize()  # bucket k-2's upload has finished reading this buffer
        views = self._views(self.param_stage[slot], k)
        for v, i in zip(views, self.buckets[k]):
            v.copy_(self.masters[i])
        if not self.cuda:
            for v, i in zip(views, self.buckets[k]):
                self.params[i].data.copy_(v)
            return
        with torch.cuda.stream(self.up):
            for v, i in zip(views, self.buckets[k]):
                self.params[i].data.copy_(v, non_blocking=True)
            self._upload_done[slot] = torch.cuda.Event()
            self._upload_done[slot].record(self.up)

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        """One optimizer step; grads[i]: the (already clipped) fp32 device gradient of params[i]."""
        if self.cuda:  # no parameter is overwritten before the kernels queued so far have read it
            self.up.wait_stream(torch.cuda.current_stream(self.device))
        self._fetch(0, grads)
        for k in range(len(self.buckets)):
            self._fetch(k + 1, grads)
            if self.cuda:
                self._grad_ready[k % 2].synchronize()
            for v, i in zip(self._views(self.grad_stage[k % 2], k), self.buckets[k]):
                self.masters[i].grad = v
            self.optimizer.step()
            for i in self.buckets[k]:
                self.masters[i].grad = None
            self._upload(k)
        if self.cuda:  # the parameters are read by the next kernels on the compute stream
            torch.cuda.current_stream(self.device).wait_stream(self.up)
            self.up.synchronize()
        self._upload_done = [None, None]


class StorageStash:
    """Move tensors' data to the host and free their storage in place; `restore()` brings it back.

    tensors: each owns its whole storage (a flat buffer, an optimizer state tensor); views into them
    stay valid across stash/restore. `keep_values=False` skips the copies (for buffers known to be
    zero, e.g. gradients right after the optimizer step): restore() then zero-fills.
    """

    def __init__(self, tensors: list[torch.Tensor]):
        for t in tensors:
            if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset() != 0:
                raise ValueError("StorageStash needs tensors that own their whole storage (not views)")
        self.tensors = list(tensors)
        self.host: list[torch.Tensor | None] = [None] * len(self.tensors)
        self.stashed = False

    def stash(self, keep_values: bool = True) -> int:
        """Copy to the host (if keep_values) and free the storage; returns the bytes freed."""
        if self.stashed:
            return 0
        freed = 0
        for i, t in enumerate(self.tensors):
            self.host[i] = host_copy(t) if keep_values else None
            freed += t.untyped_storage().nbytes()
            t.untyped_storage().resize_(0)
        self.stashed = True
        return freed

    def restore(self) -> None:
        """Re-allocate every storage and copy the stashed values back (zeros if none were kept)."""
        if not self.stashed:
            return
        for i, t in enumerate(self.tensors):
            t.untyped_storage().resize_(t.numel() * t.element_size())
            if self.host[i] is None:
                t.zero_()
            else:
                t.copy_(self.host[i], non_blocking=True)
            self.host[i] = None
        if self.tensors and self.tensors[0].is_cuda:
            torch.cuda.current_stream(self.tensors[0].device).synchronize()  # pinned sources may be reused
        self.stashed = False


class LayerStreamer:
    """Parameters of `layers` live on the host (pinned); each layer is copied to `device` just before
    its forward and dropped right after, the next one prefetched on a side stream (CUDA).

    Forward-only (frozen) modules: the parameters' `.data` is swapped, so no gradient may flow to
    them. `loads` counts layer uploads (for tests and metrics).
    """

    def __init__(self, layers: torch.nn.ModuleList, device: torch.device):
        self.layers, self.device = list(layers), torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.host = [[host_copy(p.data) if self.cuda else p.data.clone() for p in layer.parameters()]
                     for layer in self.layers]
        for layer, host in zip(self.layers, self.host):
            for p, h in zip(layer.parameters(), host):
                if p.requires_grad:
                    raise ValueError("LayerStreamer streams frozen layers only (requires_grad must be False)")
                p.data = h
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._ready: dict[int, tuple[list[torch.Tensor], object]] = {}
        self.loads = 0
        for i, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(lambda m, a, i=i: self._before(i))
            layer.register_forward_hook(lambda m, a, o, i=i: self._after(i))

    def _upload(self, i: int) -> None:
        """Start copying layer i to the device (side stream on CUDA)."""
        if i in self._ready or i >= len(self.layers):
            return
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                tensors = [h.to(self.device, non_blocking=True) for h in self.host[i]]
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            tensors, event = [h.clone() for h in self.host[i]], None
        self._ready[i] = (tensors, event)
        self.loads += 1

    def _before(self, i: int) -> None:
        self._upload(i)
        tensors, event = self._ready.pop(i)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in tensors:
                t.record_stream(current)  # allocated on the side stream, used (and freed) on this one
        for p, t in zip(self.layers[i].parameters(), tensors):
            p.data = t
        self._upload(i + 1)  # prefetch the next layer while this one computes

    def _after(self, i: int) -> None:
        for p, h in zip(self.layers[i].parameters(), self.host[i]):
            p.data = h
