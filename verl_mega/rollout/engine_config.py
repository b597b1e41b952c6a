"""`EngineConfig`: the sizes and switches of the generation engine, written once.

A plain dataclass without torch so that `TrainerConfig` (trainer/config.py, loaded by the CLI
launcher) can nest it as `rollout.engine` without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional


ATTENTION = ("auto", "gather", "paged")
PAGED_TILE = 64  # tokens per K/V tile of the paged decode kernel (`paged_attention.py`); block_size must divide it
SAMPLERS = ("auto", "torch", "fused")


@dataclass
class EngineConfig:
    """Generation engine sizes (continuous batching over a paged KV cache)."""

    max_batch: int = 256  # most sequences decoded together; waiting requests join as running ones finish
    max_tokens: int = 262144  # KV-cache budget in tokens (prompt + generated, all running sequences together)
    max_seq_len: int = 4096  # longest sequence (prompt + response) one row may reach
    block_size: int = 16  # tokens per KV-cache block
    prefill_tokens: int = 8192  # most prompt tokens (rows x padded length) per prefill forward
    kv_len_bucket: int = 64  # attention="gather": decode attends over the gathered blocks rounded up to this many tokens (the paged kernel reads each row's own length)
    sync_every: Optional[int] = None  # decode steps per host check (finished rows, joins); None: 8 on CUDA, 1 on CPU
    cuda_graph: bool = True  # capture decode steps in CUDA graphs (CUDA models only; ignored on CPU)
    graph_batch_step: int = 16  # with cuda_graph: a decode step runs its live rows rounded up to 1, 2, 4, 8, then a multiple of this (one graph per bucket; smaller = fewer dead rows, more graphs)
    look_ahead: bool = True  # launch the next decode window before reading the last one (host bookkeeping overlaps decoding; a finished row is decoded one window more); False: read each window right after launching it
    cuda_graph_window: bool = False  # where the fused sampler draws every row alike (greedy / temperature): a whole decode window (sync_every steps and their sampling) as one CUDA graph, one launch per window (+2% decode tokens/s at 0.5B on an H100 in the rollout benchmark, none in a 1.5B GRPO step; a window capture costs about 5x a step graph's); False: a graph per step, sampling eager
    share_prefix: bool = True  # the n samples of a prompt prefill it once and read the same prompt blocks
    attention: str = "auto"  # decode attention: "gather" (blocks copied for SDPA; every device) | "paged" (Triton flash-decoding on the blocks in place; CUDA) | "auto" (paged on CUDA, gather elsewhere)
    sampler: str = "auto"  # token sampling: "torch" (every device) | "fused" (one Triton pass over the logits for greedy / temperature sampling; top-k / top-p stay on torch; CUDA) | "auto" (fused on CUDA, torch elsewhere)

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_tokens", "max_seq_len", "block_size", "prefill_tokens", "kv_len_bucket",
                     "graph_batch_step"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"engine config {name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.sync_every is not None and self.sync_every < 1:
            raise ValueError(f"engine config sync_every must be >= 1 or None, got {self.sync_every!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"engine config attention must be one of {ATTENTION}, got {self.attention!r}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"engine config sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.max_tokens < self.block_size:
            raise ValueError(f"engine config max_tokens={self.max_tokens} is smaller than one block "
                             f"(block_size={self.block_size})")

    def decode_attention(self, triton_on_cuda: bool) -> str:
        """The decode attention this config runs: `attention`, or for "auto" "paged" where Triton runs on CUDA
        and block_size divides the paged kernel's tile, "gather" elsewhere."""
        if self.attention != "auto":
            return self.attention
        return "paged" if triton_on_cuda and PAGED_TILE % self.block_size == 0 else "gather"

    def resized(self, *, max_seq_len: int) -> "EngineConfig":
        """A copy whose max_seq_len covers `max_seq_len` (rounded up to a multiple of 64)."""
        return replace(self, max_seq_len=max(self.max_seq_len, -(-max_seq_len // 64) * 64))
