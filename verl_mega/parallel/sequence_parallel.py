"""Megatron sequence parallelism: the collectives that move activations between sequence shards and TP blocks.

With tp > 1, the parts of a layer outside the TP blocks (norms, residual adds, dropout) run on a 1/tp slice
of the sequence instead of on a replicated copy: before each TP block (attention, MLP) the shards are
all-gathered along the sequence, and after it the row-parallel output's partial sums are reduce-scattered
back to shards (replacing the all-reduce: same traffic, 1/tp of the activation memory outside the blocks).
Sequences are dim 1 ([batch, seq, hidden], batch = 1 for packed micro-batches).

Each collective is a small autograd function taking an explicit `group` (forward and backward in its
docstring), built on `all_gather_into_tensor` / `reduce_scatter_tensor` along the sequence-first view.
Both run on NCCL and, since torch 2.13 at least, on gloo (checked on 2 gloo ranks against their
definitions, tests/parallel/test_sequence_parallel.py), so CI tests the same code as the GPU runs; no
all-reduce fallback is needed. megatron-core's own `sequence_parallel=True` layers do not run here: they
need megatron's global memory buffer (global parallel state), and they gather along dim 0 (sequence-first).

Reference: Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (2022), §4.2;
megatron-core `tensor_parallel/mappings.py` (which works on dim 0, sequence-first; ours is batch-first).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from verl_mega.parallel.dist import all_gather_single, reduce_scatter_single


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """[B, s, ...] shards -> [B, s * n, ...] (concatenated along dim 1 in rank order)."""
    xs = x.transpose(0, 1).contiguous()  # [s, B, ...]: sequence first (no copy when B = 1)
    out = xs.new_empty((group.size() * xs.shape[0], *xs.shape[1:]))
    all_gather_single(out, xs, group=group)
    return out.transpose(0, 1)


def _split(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's slice along dim 1 (dim 1 divisible by the group size)."""
    return x.chunk(group.size(), dim=1)[group.rank()].contiguous()


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group, then this rank's slice along dim 1 (dim 1 divisible by the group size)."""
    xs = x.transpose(0, 1).contiguous()  # [S, B, ...]
    out = xs.new_empty((xs.shape[0] // group.size(), *xs.shape[1:]))
    reduce_scatter_single(out, xs, group=group)
    return out.transpose(0, 1)


class _ScatterToSequence(torch.autograd.Function):
    """Forward: keep this rank's sequence slice. Backward: all-gather the slices' gradients."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    """Forward: all-gather the sequence slices. Backward: reduce-scatter (the gathered tensor feeds a TP block,
    each rank's gradient is a partial sum), or just this rank's slice when `grad_replicated` (every rank
    already holds the full gradient, e.g. after the vocab-parallel log-prob or a replicated head)."""

    @staticmethod
    def forward(ctx, x, group, grad_replicated):
        ctx.group, ctx.grad_replicated = group, grad_replicated
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        return (_split(grad, ctx.group) if ctx.grad_replicated else _reduce_scatter(grad, ctx.group)), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    """Forward: sum the row-parallel partial outputs and keep this rank's slice. Backward: all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group), None


class _AllReduceGrad(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce the gradient (a replicated weight used on a sequence shard)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """[B, S, ...] replicated -> [B, S/n, ...] this rank's slice (backward: all-gather)."""
    return x if group.size() == 1 else _ScatterToSequence.apply(x, group)


def gather_from_sequence(x: torch.Tensor, group, grad_replicated: bool = False) -> torch.Tensor:
    """[B, S/n, ...] slices -> [B, S, ...] (backward: reduce-scatter, or slice if `grad_replicated`)."""
    return x if group.size() == 1 else _GatherFromSequence.apply(x, group, grad_replicated)


def reduce_scatter_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """[B, S, ...] partial sums -> [B, S/n, ...] summed slice (backward: all-gather)."""
    return x if group.size() == 1 else _ReduceScatterToSequence.apply(x, group)


def all_reduce_grad(weight: torch.Tensor, group) -> torch.Tensor:
    """`weight` as is, its gradient summed over `group` (norm weights applied to sequence shards; a replicated
    input feeding vocab-parallel shards in the log-prob reference)."""
    return weight if group.size() == 1 else _AllReduceGrad.apply(weight, group)
