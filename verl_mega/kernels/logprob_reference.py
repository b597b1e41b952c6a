"""Plain-torch reference for the fused log-prob + entropy: materialised logits and `log_softmax`.

Used by the tests (and the benchmark's "naive" column). Same signature as
`verl_mega.kernels.logprob.fused_logprob_entropy`; it computes in fp32 from the (possibly bf16)
inputs and materialises the full [N, V] logits, gathering the vocab shards over `tp_group`.

Under tensor parallelism the shards are assumed to be even and in rank order (Megatron's
`VocabParallelEmbedding` split); `hidden` is replicated over `tp_group` and its gradient is summed
over the group (like the input of a `ColumnParallelLinear`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from verl_mega.parallel.sequence_parallel import all_reduce_grad


class _GatherLastDim(torch.autograd.Function):
    """Forward: all-gather along the last dim (rank order). Backward: keep this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.width = group, x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        rank = dist.get_rank(ctx.group)
        return grad[..., rank * ctx.width:(rank + 1) * ctx.width].contiguous(), None


def reference_logprob_entropy(hidden, weight, labels, *, tp_group=None, vocab_start=None, true_vocab_size=None,
                              temperature=1.0, compute_entropy=True, chunk_size=None, impl=None):
    """log p(label) and entropy from fully materialised fp32 logits (reference; O(N * V) memory).

    hidden [..., H], weight [V_local, H], labels [...] global ids -> (logprob [...] fp32,
    entropy [...] fp32 or None). `vocab_start`, `chunk_size` and `impl` are accepted for signature
    parity and ignored (shards are taken in rank order).
    """
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    h = hidden.float()
    if tp > 1:
        h = all_reduce_grad(h, tp_group)  # identity forward; gradient summed over the vocab shards
    logits = h @ weight.float().t() / temperature  # [..., V_local]
    if tp > 1:
        logits = _GatherLastDim.apply(logits, tp_group)  # [..., V_local * tp]
    vocab = logits.shape[-1] if true_vocab_size is None else true_vocab_size
    valid = torch.arange(logits.shape[-1], device=logits.device) < vocab
    logits = logits.masked_fill(~valid, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    logprob = logp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)
    if not compute_entropy:
        return logprob, None
    entropy = -(logp.exp() * logp.masked_fill(~valid, 0.0)).sum(-1)
    return logprob, entropy
