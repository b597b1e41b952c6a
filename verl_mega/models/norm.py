"""RMSNorm (Zhang & Sennrich, 2019) as transformers' LlamaRMSNorm: normalised in fp32, scaled in the input dtype.

Its own module because both the decoder and the vision tower use it.
"""

from __future__ import annotations

import torch
from torch import nn

from verl_mega.models import fused_ops
from verl_mega.parallel import sequence_parallel as sp


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32 (as transformers' LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor, fused: bool = False, sp_group=None) -> torch.Tensor:
        """sp_group: x is a sequence shard (sequence parallel); the weight's gradient is summed over the group."""
        if fused:
            return fused_ops.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = self.weight if sp_group is None else sp.all_reduce_grad(self.weight, sp_group)
        return weight * x32.to(x.dtype)

    def fused_add(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One fused_ops kernel, no autograd: (norm(x + delta), x + delta) for x, delta [..., dim] (the sum rounded
        to their dtype, as torch's add); delta None: (norm(x), x)."""
        if delta is None:
            return fused_ops.rms_norm(x, self.weight, self.eps), x
        return fused_ops.rms_norm(delta, self.weight, self.eps, residual=x)
