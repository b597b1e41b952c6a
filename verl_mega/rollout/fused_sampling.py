"""One pass over the logits per decode step: next token and its log-prob (Triton).

What: for logits [B, V] float32, the same draw as `sampling.sample_tokens` for greedy and for plain
temperature sampling (top_k = 0, top_p = 1): one program per row walks the vocabulary in blocks of
BLOCK, keeps the running max / sum of exp(x / T) (log-sum-exp, FlashAttention's online softmax) and the
running argmax of x / T + G, G = -log(-log U) a Gumbel draw from Philox uniforms U (`tl.rand`): the
Gumbel-max trick, the log form of the torch path's exponential race argmax(p / E), E = -log U, so an
exact draw from softmax(x / T). Greedy takes argmax(x) with T = 1. The log-prob of the chosen (or
forced) token is x_t / T - logsumexp(x / T), as `sample_tokens` reports it. The torch path makes about
ten passes over [B, V] float32 (log-softmax, exp, the exponential draws, the division, argmax); this
reads the logits once and writes two numbers per row.

Randomness: a 31-bit seed per call is drawn on the device from the engine's `torch.Generator` (no host
sync, graph-safe), and element (row, v) uses Philox counter row * V + v: same generator state, same
logits -> same tokens; the stream differs from the torch path's.

top-k / top-p truncation is not fused: those calls take `sample_tokens`.
"""

from __future__ import annotations

import torch

from verl_mega.rollout.sampling import SamplingParams, sample_tokens

BLOCK = 2048  # vocabulary entries per loop iteration


def _kernel():
    import triton  # lazy: TRITON_INTERPRET is read when the kernel is decorated
    import triton.language as tl

    @triton.jit
    def fused_sample_kernel(logits_ptr, stride, seed_ptr, forced_ptr, token_ptr, logprob_ptr, inv_temp,
                            V: tl.constexpr, NB: tl.constexpr, BLOCK: tl.constexpr, GREEDY: tl.constexpr,
                            HAS_FORCED: tl.constexpr):
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * stride
        seed = tl.load(seed_ptr)
        m = tl.full([], float("-inf"), tl.float32)  # running max of x / T
        l = tl.zeros([], tl.float32)  # running sum of exp(x / T - m)
        best = tl.full([], float("-inf"), tl.float32)
        best_idx = tl.zeros([], tl.int32)
        for j in range(NB):
            offs = j * BLOCK + tl.arange(0, BLOCK)
            valid = offs < V
            x = tl.load(base + offs, mask=valid, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(x, axis=0))
            finite = m_new > float("-inf")  # a block (and all before it) of -inf only: nothing to add yet
            shift = tl.where(finite, m_new, 0.0)
            l = l * tl.where(finite, tl.exp(m - shift), 0.0) + tl.sum(tl.exp(x - shift), axis=0)
            m = m_new
            if GREEDY:
                key = x
            else:
                u = tl.rand(seed, row * V + offs)  # uniform in [0, 1)
                key = x - tl.log(-tl.log(tl.maximum(u, 1e-12)))  # + Gumbel(0, 1)
            key = tl.where(valid, key, float("-inf"))
            block_best = tl.max(key, axis=0)
            better = block_best > best
            best_idx = tl.where(better, j * BLOCK + tl.argmax(key, axis=0), best_idx)
            best = tl.where(better, block_best, best)
        token = best_idx.to(tl.int64)
        if HAS_FORCED:
            forced = tl.load(forced_ptr + row)
            token = tl.where(forced >= 0, forced, token)
        x_token = tl.load(base + token).to(tl.float32) * inv_temp
        tl.store(token_ptr + row, token)
        tl.store(logprob_ptr + row, x_token - (m + tl.log(l)))

    return fused_sample_kernel


_KERNEL: list = []


def sample_tokens_fused(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                        forced: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_tokens`' contract (tokens [B] int64, logprobs [B] float32; `forced` [B] int64, -1 = sample) in
    one Triton pass for greedy and plain temperature sampling; top-k / top-p go to `sample_tokens`.
    logits: [B, V] float32 with unit last stride, on CUDA (or on CPU under TRITON_INTERPRET=1)."""
    if params.top_k or params.top_p < 1.0:
        return sample_tokens(logits, params, generator, forced)
    if not _KERNEL:
        _KERNEL.append(_kernel())
    b, v = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if forced is not None:
        forced = forced.contiguous()  # the kernel reads forced[row] at offset row (the engine passes a column view)
    tokens = torch.empty(b, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(b, dtype=torch.float32, device=logits.device)
    seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=logits.device)
    _KERNEL[0][(b,)](logits, logits.stride(0), seed, tokens if forced is None else forced, tokens, logprobs,
                     1.0 if params.greedy else 1.0 / params.temperature, V=v, NB=-(-v // BLOCK), BLOCK=BLOCK,
                     GREEDY=params.greedy, HAS_FORCED=forced is not None)
    return tokens, logprobs
