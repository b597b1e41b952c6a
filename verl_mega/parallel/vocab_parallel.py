"""Per-token log-probabilities with the vocabulary split over tensor-parallel ranks (plain torch).

Each tp rank holds a [V_pad/tp, H] slice of the LM head, so it computes only its slice of the
logits; the softmax normaliser and the target logit are combined with all-reduces over the tp
group (max without gradient, sums with megatron's `reduce_from_tensor_model_parallel_region`:
all-reduce forward, identity backward, because the loss is replicated over tp); the gradient
w.r.t. the replicated hidden states is summed over tp (`copy_to_tensor_model_parallel_region`,
as in a column-parallel linear layer). Padded vocabulary
columns (index >= true_vocab_size) are masked to -inf.

This is the reference-speed path used by the engine's next-token loss (SFT, tests, benchmark); RL
losses use the fused kernel in `verl_mega/kernels/logprob.py`, which computes the same quantity.
Reference: Megatron-LM `tensor_parallel/cross_entropy.py` (which reads the global TP group; this
takes it as an argument).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                         reduce_from_tensor_model_parallel_region)


def vocab_parallel_log_probs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, tp_group,
                             vocab_start: int, true_vocab_size: int, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(hidden @ weight.T / temperature)[label] over the full (tp-split) vocabulary.

    hidden [B, S, H], weight [V_local, H] (this rank's vocab rows starting at `vocab_start`),
    labels [B, S] (global token ids; any value < true_vocab_size). Returns fp32 [B, S], identical on
    every tp rank, differentiable w.r.t. hidden and weight.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    local_v = weight.shape[0]
    if tp_group.size() > 1:  # identity forward; all-reduce of d/d(hidden) backward (each rank saw V/tp columns)
        hidden = copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    logits = (hidden @ weight.t()).float() / temperature  # [batch, seq, V_local]
    cols = torch.arange(vocab_start, vocab_start + local_v, device=logits.device)
    logits = logits.masked_fill(cols >= true_vocab_size, float("-inf"))
    row_max = logits.detach().max(dim=-1).values  # [batch, seq]
    if tp_group.size() > 1:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
    sum_exp = (logits - row_max.unsqueeze(-1)).exp().sum(dim=-1)  # [batch, seq]
    local_label = labels - vocab_start
    in_shard = (local_label >= 0) & (local_label < local_v)
    target = logits.gather(-1, local_label.clamp(0, local_v - 1).unsqueeze(-1)).squeeze(-1)  # [batch, seq]
    target = torch.where(in_shard, target, torch.zeros_like(target))
    if tp_group.size() > 1:
        sum_exp = reduce_from_tensor_model_parallel_region(sum_exp, group=tp_group)
        target = reduce_from_tensor_model_parallel_region(target, group=tp_group)
    return target - row_max - sum_exp.log()
