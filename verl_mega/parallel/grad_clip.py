"""Global gradient-norm clipping, exact across tensor, pipeline and data (ZeRO) parallelism.

The global L2 norm is sqrt(sum of squares over every distinct parameter of the model). Each rank
contributes only the gradients it is responsible for, so every element is counted exactly once:
- TP: sharded parameters (`tensor_model_parallel=True`) on every tp rank (disjoint shards);
  replicated ones (norms, biases of row-parallel layers, value head) on tp rank 0 only.
- PP: each stage its own layers; the tied-embedding copy on the last stage (`shared_embedding`,
  not on the first stage) is skipped, the first stage's copy counts.
- DP with ZeRO-1: after the all-reduce all dp ranks hold the same gradients; each parameter is
  counted by its owner dp rank only.
The squared sums are then all-reduced over the model-parallel group and the dp group, so all
ranks return the same norm; clipping scales the local gradients by min(1, max_norm / (norm + 1e-6)),
as `torch.nn.utils.clip_grad_norm_` does.

Reference: Megatron-core `optimizer/clip_grads.py`. Uses torch's `get_total_norm` for the local part
and `clip_grads_with_norm_`'s arithmetic for the scaling.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def counts_for_norm(param: torch.Tensor, *, tp_rank: int, is_first_stage: bool) -> bool:
    """Whether this rank's copy of `param` contributes to the global norm (before ZeRO ownership)."""
    if getattr(param, "shared_embedding", False) and not is_first_stage:
        return False
    return bool(getattr(param, "tensor_model_parallel", False)) or tp_rank == 0


def global_grad_norm(grads: list[torch.Tensor], groups: list) -> torch.Tensor:
    """L2 norm of the union of all ranks' `grads` (each element supplied by exactly one rank).

    grads: this rank's counted gradients (any shapes). groups: process groups whose product spans
    the layout (e.g. [mp_group, dp_group]); the squared sum is all-reduced over each in turn.
    Returns a 0-dim fp32 tensor, the same on every rank.
    """
    device = grads[0].device if grads else _group_device(groups)
    if grads:
        local = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=None).float() ** 2
    else:
        local = torch.zeros((), dtype=torch.float32, device=device)
    local = local.reshape(1)
    for group in groups:
        if group is not None and group.size() > 1:
            dist.all_reduce(local, group=group)
    return local.sqrt()[0]


@torch.no_grad()
def clip_grads_(grads: list[torch.Tensor], max_norm: float, total_norm: torch.Tensor) -> None:
    """Scale gradient tensors in place by min(1, max_norm / (total_norm + 1e-6)); no-op if max_norm <= 0.

    The arithmetic of `torch.nn.utils.clip_grads_with_norm_`, which takes parameters (their `.grad`);
    ours are the fp32 `main_grad` buffers, which are no parameter's `.grad`."""
    if max_norm > 0 and grads:
        coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].device))


def _group_device(groups) -> torch.device:
    backend = next((dist.get_backend(g) for g in groups if g is not None), "gloo")
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
