"""One pass over the logits per decode step: next token and its log-prob (Triton).

What: for logits [B, V] (float32 or the LM head's bf16 / fp16, computed in float32), the same distribution as
`sampling.sample_tokens` for greedy and for plain temperature sampling (top_k = 0, top_p = 1): each row's
vocabulary is cut into `splits` contiguous parts (enough programs to fill the GPU when few rows are left); a
program walks its part in blocks of BLOCK and keeps the running max / sum of exp(x / T) (log-sum-exp,
FlashAttention's online softmax), and for greedy the running argmax of x. A second kernel, one program per
row, merges the parts (log-sum-exp merge) and picks the token:
  - greedy: the best of the parts' argmaxes (the lowest index on ties, as torch.argmax);
  - sampled: the inverse CDF at one uniform draw u per row: the part where the cumulative mass of
    exp(x / T - max) first exceeds u x its total, then the first token of that part where it does (that part
    re-read block by block until the token is found; on average half of one part). An exact draw from
    softmax(x / T), with one random number per row instead of one per vocabulary entry (the Gumbel-max
    form this replaces drew a Philox number and took two logarithms per entry: 255 us per step on an H100 in
    the 0.5B rollout benchmark, 91 us for the two kernels here; benchmarks/results/h100_2026-12-06e).
The log-prob of the chosen (or forced) token is x_t / T - logsumexp(x / T), as `sample_tokens` reports it. The
torch path makes about ten passes over [B, V] float32 (log-softmax, exp, the exponential draws, the division,
argmax); this reads the logits once (plus part of one part per sampled row) and writes two numbers per row.

Randomness: a 31-bit seed per call, drawn on the device from the engine's `torch.Generator` (no host
sync) or passed in as a device tensor; row r's uniform is Philox counter r under it: same seed, same logits
-> same tokens; the stream differs from the torch path's. The parts' cut does not change u, only the float32
summation order of the masses compared against it.

top-k / top-p truncation is not fused: those calls take `sample_tokens` (on the logits cast to float32).
"""

from __future__ import annotations

import functools

import torch

from verl_mega.kernels.dispatch import size_stable_jit, sm_count
from verl_mega.rollout.sampling import SamplingParams, sample_tokens

BLOCK = 2048  # vocabulary entries per loop iteration
# Vocabulary splits are chosen so that rows x splits >= this many programs per SM. 32: on an H100 (sampler_sizes.py
# --programs-per-sm, benchmarks/results/h100_2026-12-07i) calls at 128-512 rows took 25 / 42 / 76 us against 47 /
# 103 / 125 us at 4 (logits read at 1.5-2.0 TB/s against 0.8-1.2); neither 16 nor 64 was faster at every row count.
PROGRAMS_PER_SM = 32


@functools.cache
def _kernels():
    import triton.language as tl  # lazy: TRITON_INTERPRET is read when the kernel is decorated

    # not specialised on the batch-following arguments: the split count and blocks per split (from the row
    # count) and the alignment of the per-row vectors (views at offsets that follow the row count or the window
    # step), so that a decode batch of a new size reuses the compiled binary (13 binaries over a 512..16-row
    # decode, 2 now: benchmarks/sampler_sizes.py). The row stride (the model's padded vocabulary) stays
    # specialised: its divisibility lets the logits loads vectorise (unspecialised, calls at 64-512 rows took
    # 7-21% longer on an H100, launch included).
    batch_stable_jit = size_stable_jit(sizes=("splits", "nb_per"),
                                       unaligned=("seed_ptr", "m_ptr", "l_ptr", "best_ptr", "idx_ptr", "forced_ptr",
                                                  "token_ptr", "logprob_ptr"))

    @batch_stable_jit
    def sample_partial_kernel(logits_ptr, stride, m_ptr, l_ptr, best_ptr, idx_ptr, inv_temp, splits, nb_per,
                              V: tl.constexpr, BLOCK: tl.constexpr, GREEDY: tl.constexpr):
        """Program (row, split): max m and sum l of exp(x / T - m) over the split's nb_per blocks of the row's
        vocabulary; greedy: also the largest x and its index."""
        row, split = tl.program_id(0), tl.program_id(1)
        base = logits_ptr + row.to(tl.int64) * stride
        m = tl.full([], float("-inf"), tl.float32)  # running max of x / T
        l = tl.zeros([], tl.float32)  # running sum of exp(x / T - m)
        best = tl.full([], float("-inf"), tl.float32)
        best_idx = tl.zeros([], tl.int32)
        j = 0
        while j < nb_per:  # (a runtime bound: `while`, which the interpreter runs too, unlike `range(nb_per)`)
            offs = (split * nb_per + j) * BLOCK + tl.arange(0, BLOCK)
            valid = offs < V
            x = tl.load(base + offs, mask=valid, other=float("-inf")).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(x, axis=0))
            finite = m_new > float("-inf")  # a block (and all before it) of -inf only: nothing to add yet
            shift = tl.where(finite, m_new, 0.0)
            l = l * tl.where(finite, tl.exp(m - shift), 0.0) + tl.sum(tl.exp(x - shift), axis=0)
            m = m_new
            if GREEDY:
                block_best = tl.max(x, axis=0)
                better = block_best > best  # strictly: the first of equal values wins, as torch.argmax
                best_idx = tl.where(better, (split * nb_per + j) * BLOCK + tl.argmax(x, axis=0), best_idx)
                best = tl.where(better, block_best, best)
            j += 1
        out = row * splits + split
        tl.store(m_ptr + out, m)
        tl.store(l_ptr + out, l)
        tl.store(best_ptr + out, best)
        tl.store(idx_ptr + out, best_idx)

    @batch_stable_jit
    def sample_merge_kernel(logits_ptr, stride, seed_ptr, m_ptr, l_ptr, best_ptr, idx_ptr, forced_ptr, token_ptr,
                            logprob_ptr, inv_temp, splits, nb_per, V: tl.constexpr, MAX_SPLITS: tl.constexpr,
                            BLOCK: tl.constexpr, GREEDY: tl.constexpr, HAS_FORCED: tl.constexpr):
        """Program row: the splits' partials merged (log-sum-exp); the token: greedy, the best of the splits (the
        lowest split on ties); sampled, the inverse CDF at one uniform u: the split where the cumulative mass
        passes u x total, then the first token of that split where it does; the forced token applied; the
        chosen token's log-prob x_t / T - logsumexp(x / T). MAX_SPLITS: a power of two >= splits."""
        row = tl.program_id(0)
        s = tl.arange(0, MAX_SPLITS)
        here = s < splits
        m = tl.load(m_ptr + row * splits + s, mask=here, other=float("-inf"))
        m_all = tl.max(m, axis=0)
        shift = tl.where(m_all > float("-inf"), m_all, 0.0)
        # [MAX_SPLITS] sum of exp(x / T - shift) per split (0 past `splits`)
        mass = tl.load(l_ptr + row * splits + s, mask=here, other=0.0) * tl.exp(m - shift)
        l_all = tl.sum(mass, axis=0)
        if GREEDY:
            best = tl.load(best_ptr + row * splits + s, mask=here, other=float("-inf"))
            token = tl.load(idx_ptr + row * splits + tl.argmax(best, axis=0)).to(tl.int64)
        else:
            u = tl.rand(tl.load(seed_ptr), row)  # uniform in [0, 1)
            cum = tl.cumsum(mass, axis=0)
            target = u * tl.max(cum, axis=0)  # the cumulative mass to pass
            part = tl.minimum(tl.sum((here & (cum <= target)).to(tl.int32), axis=0), splits - 1)  # first passing
            rest = target - tl.sum(tl.where(s < part, mass, 0.0), axis=0)  # what is left to pass inside it
            base = logits_ptr + row.to(tl.int64) * stride
            token = tl.full([], -1, tl.int64)
            last = tl.full([], -1, tl.int64)  # the split's last token of nonzero mass (float rounding fallback)
            run = tl.zeros([], tl.float32)
            j = 0
            while (j < nb_per) & (token < 0):  # the split's blocks in order until one passes the target
                offs = (part * nb_per + j) * BLOCK + tl.arange(0, BLOCK)
                valid = offs < V
                x = tl.load(base + offs, mask=valid, other=float("-inf")).to(tl.float32) * inv_temp
                e = tl.exp(x - shift)
                passed = (run + tl.cumsum(e, axis=0) > rest) & (e > 0)
                first = tl.min(tl.where(passed, offs, V), axis=0)
                token = tl.where(first < V, first.to(tl.int64), token)
                last = tl.maximum(last, tl.max(tl.where(e > 0, offs, -1), axis=0).to(tl.int64))
                run += tl.sum(e, axis=0)
                j += 1
            token = tl.maximum(tl.where(token < 0, last, token), 0)  # (0: a row of -inf only, as torch.argmax)
        if HAS_FORCED:
            forced = tl.load(forced_ptr + row)
            token = tl.where(forced >= 0, forced, token)
        x_token = tl.load(logits_ptr + row.to(tl.int64) * stride + token).to(tl.float32) * inv_temp
        tl.store(token_ptr + row, token)
        tl.store(logprob_ptr + row, x_token - (m_all + tl.log(l_all)))

    return sample_partial_kernel, sample_merge_kernel


def vocab_splits(rows: int, blocks: int, device: torch.device) -> int:
    """Splits of each row's vocabulary (a power of two <= blocks): enough for rows x splits to fill the SMs
    PROGRAMS_PER_SM deep (a decode batch's tail of a few rows would leave most SMs idle); 1 off CUDA."""
    if device.type != "cuda":
        return 1
    want = -(-PROGRAMS_PER_SM * sm_count(device) // rows)
    splits = 1
    while splits * 2 <= min(want, blocks):
        splits *= 2
    return splits


def sample_tokens_fused(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                        forced: torch.Tensor | None = None, *, seed: torch.Tensor | None = None,
                        block: int = BLOCK, splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`sample_tokens`' contract (tokens [B] int64, logprobs [B] float32; `forced` [B] int64, -1 = sample) in
    one Triton pass for greedy and plain temperature sampling; top-k / top-p go to `sample_tokens`.
    logits: [B, V] (any float dtype, unit last stride), on CUDA (or on CPU under TRITON_INTERPRET=1).
    seed: None (a seed is drawn from `generator`) or a [1] int64 device tensor in [0, 2^31) (the engine draws a
    decode window's seeds at once, so that a CUDA graph of the window reads them from a static buffer).
    block: vocabulary entries per loop iteration; splits: programs per row (a power of two; None:
    `vocab_splits`). Neither changes the draw: row r's uniform is always Philox counter r (only the float32
    summation order of the masses compared against it)."""
    if params.top_k or params.top_p < 1.0:
        return sample_tokens(logits.float(), params, generator, forced)
    partial, merge = _kernels()
    b, v = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if forced is not None:
        forced = forced.contiguous()  # the kernel reads forced[row] at offset row (the engine passes a column view)
    blocks = -(-v // block)
    splits = splits or vocab_splits(b, blocks, logits.device)
    if splits & (splits - 1) or splits > blocks:
        raise ValueError(f"sample_tokens_fused: splits must be a power of two <= {blocks} blocks, got {splits}")
    stats = torch.empty(4, b, splits, dtype=torch.float32, device=logits.device)  # m, l, best key, best index
    index = stats[3].view(torch.int32)
    tokens = torch.empty(b, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(b, dtype=torch.float32, device=logits.device)
    if seed is None:
        seed = torch.randint(0, 2**31 - 1, (1,), generator=generator, device=logits.device)
    inv_temp = 1.0 if params.greedy else 1.0 / params.temperature
    nb_per = -(-blocks // splits)
    partial[(b, splits)](logits, logits.stride(0), stats[0], stats[1], stats[2], index, inv_temp, splits, nb_per,
                         V=v, BLOCK=block, GREEDY=params.greedy)
    merge[(b,)](logits, logits.stride(0), seed, stats[0], stats[1], stats[2], index,
                tokens if forced is None else forced, tokens, logprobs, inv_temp, splits, nb_per, V=v,
                MAX_SPLITS=1 << (blocks - 1).bit_length(), BLOCK=block, GREEDY=params.greedy,
                HAS_FORCED=forced is not None)
    return tokens, logprobs
