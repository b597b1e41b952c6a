"""Token sampling over a vocabulary sharded across tensor-parallel ranks.

What: turn the last-position logits of a batch into next tokens and their log-probabilities:
greedy (temperature 0), temperature, top-k and top-p (nucleus) sampling, with a seeded
`torch.Generator` so that a run is reproducible.

Tensor parallelism: the model's head returns the local vocab shard [B, V_pad / tp] on each rank.
`gather_vocab_logits` all-gathers the shards over the tp group into the full padded vocab and
drops the padding columns (ids >= true_vocab_size), so they can never be sampled. Every rank then
samples from identical logits with an identically seeded generator and draws identical tokens: no
broadcast is needed (the tests check the ranks agree).

Sampling uses the exponential race (Gumbel-max in another form, as vLLM does):
argmax(p / E) with E ~ Exp(1) i.i.d. is an exact draw from p and needs no host sync.

Log-probabilities (a deliberate choice, as in verl): the log-prob of a sampled token is taken from
log_softmax(logits / temperature) over the FULL vocabulary, i.e. the temperature-scaled
distribution *before* top-k / top-p truncation; this is what the trainer's teacher-forced
log-prob at the same temperature recomputes. Greedy decoding reports log_softmax(logits)
(temperature 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from verl_mega.parallel.dist import all_gather_single


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token.

    temperature: 0 means greedy (argmax); > 0 divides the logits before softmax.
    top_k: keep only the k most likely tokens (0 = no limit).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1 = all).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = disabled), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def gather_vocab_logits(local_logits: torch.Tensor, tp_group: dist.ProcessGroup | None,
                        true_vocab_size: int) -> torch.Tensor:
    """All-gather vocab-sharded logits into the full vocabulary, padding columns removed.

    local_logits: [B, V_pad / tp] this rank's shard (rank r holds columns r*V_pad/tp ...).
    Returns [B, true_vocab_size] float32, identical on every rank of `tp_group`.
    """
    tp = 1 if tp_group is None else dist.get_world_size(tp_group)
    local_logits = local_logits.float().contiguous()
    if tp == 1:
        full = local_logits
    elif local_logits.is_cuda:
        b, v = local_logits.shape
        stacked = torch.empty(tp, b, v, dtype=local_logits.dtype, device=local_logits.device)
        all_gather_single(stacked, local_logits, group=tp_group)
        full = stacked.permute(1, 0, 2).reshape(b, tp * v)  # [B, tp * V_local]
    else:  # gloo has no all_gather_into_tensor
        parts = [torch.empty_like(local_logits) for _ in range(tp)]
        dist.all_gather(parts, local_logits, group=tp_group)
        full = torch.cat(parts, dim=-1)  # [B, tp * V_local]
    if full.shape[-1] < true_vocab_size:
        raise ValueError(f"gathered vocab {full.shape[-1]} is smaller than true_vocab_size {true_vocab_size}")
    return full[:, :true_vocab_size]


def truncate_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / top-p set to -inf (the most likely token always stays).

    logits: [B, V] float32 (already temperature-scaled). Returns a new [B, V] tensor.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of strictly more likely tokens
        drop_sorted = mass_before >= top_p  # never drops the first (mass_before = 0 < top_p)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                  forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row and return (tokens [B] int64, logprobs [B] float32).

    logits: [B, V] float32 over the true vocabulary (see `gather_vocab_logits`). Greedy takes the
    argmax; otherwise tokens are drawn from softmax(truncate(logits / T)) with `generator`.
    logprobs are log_softmax(logits / T) at the chosen tokens (untruncated, T = 1 for greedy).
    forced: None or [B] int64 on logits' device: rows with an id >= 0 take that token instead (scripted
    tokens, e.g. a forced EOS), with its log-prob as above; the random draws are made for every row.
    """
    if params.greedy:
        tokens = torch.argmax(logits, dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1)
    else:
        scaled = logits / params.temperature if params.temperature != 1.0 else logits
        logprobs = torch.log_softmax(scaled, dim=-1)
        if params.top_k == 0 and params.top_p == 1.0:
            probs = logprobs.exp()  # untruncated: reuse the log-softmax (fewer passes over [B, V])
        else:
            probs = torch.softmax(truncate_logits(scaled, params.top_k, params.top_p), dim=-1)
        race = torch.empty_like(probs).exponential_(generator=generator)  # E ~ Exp(1)
        tokens = torch.argmax(probs.div_(race), dim=-1)
    if forced is not None:
        tokens = torch.where(forced >= 0, forced, tokens)
    chosen = logprobs.gather(-1, tokens[:, None]).squeeze(-1)  # [B]
    return tokens, chosen
