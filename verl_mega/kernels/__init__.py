"""Fused kernels with plain-torch references: vocab-parallel log-prob + entropy, advantage estimators.

Triton on CUDA (and on CPU under TRITON_INTERPRET=1, for tests), torch elsewhere; see `dispatch.py`.
"""

from verl_mega.kernels.advantage import (
    gae_advantages,
    grpo_advantages,
    masked_mean,
    masked_var,
    masked_whiten,
    reference_gae,
    reinforce_pp_baseline_advantages,
    reinforce_pp_returns,
    rloo_advantages,
)
from verl_mega.kernels.dispatch import resolve_impl, use_triton
from verl_mega.kernels.logprob import fused_logprob_entropy, warm_up_logprob_kernels
from verl_mega.kernels.logprob_reference import reference_logprob_entropy

__all__ = [
    "fused_logprob_entropy", "reference_logprob_entropy", "gae_advantages", "reference_gae", "grpo_advantages",
    "rloo_advantages", "reinforce_pp_returns", "reinforce_pp_baseline_advantages", "masked_mean", "masked_var",
    "masked_whiten", "use_triton", "resolve_impl", "warm_up_logprob_kernels",
]
