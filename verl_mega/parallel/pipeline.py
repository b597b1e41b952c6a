"""1F1B pipeline schedule (PipeDream-Flush): warm-up forwards, steady one-forward-one-backward, cool-down backwards.

The schedule never knows the model. It is driven by two callables:

    forward_step(model, microbatch, input_tensor) -> output_tensor
        input_tensor is None on the first stage (read the micro-batch), the previous stage's
        activation otherwise; the output goes to the next stage, or to `loss_fn` / `output_fn`
        on the last stage.
    loss_fn(output, microbatch) -> (loss, metrics)          (forward-backward mode, last stage)
    output_fn(output, microbatch) -> dict[str, Tensor]      (forward-only mode, last stage)

Stage s of p runs min(p - s - 1, M) warm-up forwards, then alternates one forward and one backward
until all M micro-batches are forwarded, then drains the remaining backwards: at most p - s
activations are alive on stage s (versus M for GPipe). With pp = 1 it degenerates to a plain
gradient-accumulation loop. `loss` is back-propagated as returned, so the caller scales it (the
engine divides by the global token count).

Reference: Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters" (2021),
§2.2 (non-interleaved 1F1B); Megatron-LM `forward_backward_pipelining_without_interleaving`; picotron.
Simplifications: no interleaved (virtual-stage) schedule, no activation deallocation trick.
"""

from __future__ import annotations

from typing import Callable

import torch

from verl_mega.parallel.p2p import PipeComm, broadcast_tensor_dicts

ForwardStep = Callable[[torch.nn.Module, dict, "torch.Tensor | None"], torch.Tensor]
LossFn = Callable[[torch.Tensor, dict], "tuple[torch.Tensor, dict]"]
OutputFn = Callable[[torch.Tensor, dict], "dict[str, torch.Tensor]"]


class _Stage:
    """One stage's view of a schedule run: forward / backward of one micro-batch plus bookkeeping."""

    def __init__(self, model, microbatches, forward_step, loss_fn, comm: PipeComm | None, before_last_backward):
        self.model, self.microbatches, self.forward_step, self.loss_fn = model, microbatches, forward_step, loss_fn
        self.comm = comm
        self.is_last = comm is None or comm.next_rank is None
        self.before_last_backward = before_last_backward
        self.metrics: list[dict] = []
        self.num_forward = self.num_backward = 0

    def forward(self, input_tensor: torch.Tensor | None) -> torch.Tensor:
        """Forward the next micro-batch; on the last stage returns its loss (and records metrics)."""
        mb = self.microbatches[self.num_forward]
        self.num_forward += 1
        output = self.forward_step(self.model, mb, input_tensor)
        if not self.is_last:
            return output
        loss, metrics = self.loss_fn(output, mb)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)}")
        self.metrics.append({"loss": loss.detach(), **metrics})
        return loss

    def backward(self, input_tensor, output, output_grad) -> torch.Tensor | None:
        """Back-propagate one micro-batch; returns the gradient w.r.t. the stage input (None on stage 0)."""
        self.num_backward += 1
        if self.num_backward == len(self.microbatches) and self.before_last_backward is not None:
            self.before_last_backward()  # e.g. let DP start its bucketed all-reduce from the grad hooks
        if input_tensor is not None:
            input_tensor.retain_grad()
        torch.autograd.backward(output, grad_tensors=output_grad)
        return input_tensor.grad if input_tensor is not None else None


def forward_backward(model, microbatches: list[dict], *, forward_step: ForwardStep, loss_fn: LossFn,
                     comm: PipeComm | None, before_last_backward: Callable[[], None] | None = None) -> list[dict]:
    """Run forward and backward of every micro-batch with the 1F1B schedule.

    Returns the per-micro-batch metrics ({"loss": scalar, **loss_fn metrics}) on the last stage and
    [] elsewhere (the engine broadcasts what it reports). `before_last_backward` runs right before
    the last micro-batch's backward on this stage. `comm` None means a single stage.
    """
    if not microbatches:
        raise ValueError("forward_backward needs at least one micro-batch")
    stage = _Stage(model, microbatches, forward_step, loss_fn, comm, before_last_backward)
    if comm is None or (comm.prev_rank is None and comm.next_rank is None):
        for _ in microbatches:
            stage.backward(None, stage.forward(None), None)
        return stage.metrics
    num_warmup = min(comm.group.size() - comm.group.rank() - 1, len(microbatches))
    in_flight = _warmup(stage, num_warmup)
    _steady(stage, in_flight, len(microbatches) - num_warmup)
    _cooldown(stage, in_flight)
    return stage.metrics if stage.is_last else []


def _warmup(stage: _Stage, num_warmup: int) -> list[tuple]:
    """Forward the first `num_warmup` micro-batches; returns their (input, output) awaiting backward."""
    in_flight = []
    for _ in range(num_warmup):
        input_tensor = stage.comm.recv_forward()
        output = stage.forward(input_tensor)
        stage.comm.send_forward(output)
        in_flight.append((input_tensor, output))
    return in_flight


def _steady(stage: _Stage, in_flight: list[tuple], num_steady: int) -> None:
    """One forward then one backward (of the oldest micro-batch in flight), `num_steady` times."""
    comm = stage.comm
    input_tensor = comm.recv_forward() if num_steady > 0 else None
    for i in range(num_steady):
        output = stage.forward(input_tensor)
        output_grad = comm.send_forward_recv_backward(output)
        in_flight.append((input_tensor, output))
        old_input, old_output = in_flight.pop(0)
        input_grad = stage.backward(old_input, old_output, output_grad)
        if i == num_steady - 1:
            comm.send_backward(input_grad)
        else:
            input_tensor = comm.send_backward_recv_forward(input_grad)


def _cooldown(stage: _Stage, in_flight: list[tuple]) -> None:
    """Backward of the micro-batches still in flight after the last forward."""
    while in_flight:
        input_tensor, output = in_flight.pop(0)
        output_grad = stage.comm.recv_backward()
        stage.comm.send_backward(stage.backward(input_tensor, output, output_grad))


@torch.no_grad()
def forward_only(model, microbatches: list[dict], *, forward_step: ForwardStep, output_fn: OutputFn,
                 comm: PipeComm | None) -> list[dict[str, torch.Tensor]]:
    """Forward every micro-batch (no graph kept); `output_fn` runs on the last stage and its
    per-micro-batch dicts are broadcast so that every rank of the pipeline returns them."""
    outputs = [] if comm is None or comm.next_rank is None else None
    for mb in microbatches:
        input_tensor = comm.recv_forward(requires_grad=False) if comm is not None else None
        output = forward_step(model, mb, input_tensor)
        if outputs is None:
            comm.send_forward(output)
        else:
            outputs.append(output_fn(output, mb))
    if comm is None or comm.group.size() == 1:
        return outputs
    return broadcast_tensor_dicts(outputs, src=comm.last_rank, group=comm.group, device=comm.device)
