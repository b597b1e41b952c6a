"""Fused vocab-parallel log-prob + entropy of the LM head, without materialising the logits.

For hidden states h [N, H] and this rank's vocab shard W [V_local, H] (rows
[vocab_start, vocab_start + V_local) of the vocabulary), with z = h @ W.T / T over the *full*
vocabulary (shards combined over `tp_group`, padding ids >= true_vocab_size excluded):

    logprob_i = z_{i, y_i} - lse_i,         lse_i = log sum_j exp(z_ij)
    entropy_i = lse_i - sum_j p_ij z_ij,    p_ij = exp(z_ij - lse_i)

Forward: per-row statistics (max m, s = sum e^(z-m), u = sum e^(z-m)(z-m), label logit) over the
local shard, then one MAX and one SUM all-reduce of [N]-sized vectors over `tp_group`.
Backward (chunk by chunk over the local vocab; nothing [N, V_local] is kept):

    dL/dz_ij = g_lp_i (1[j = y_i] - p_ij) - g_ent_i p_ij (z_ij - E_p[z]_i)
    grad_h = sum_chunks (dL/dz / T) @ W_chunk   (then all-reduced over tp_group: h is replicated)
    grad_W_chunk = (dL/dz / T).T @ h            (written once per chunk: no accumulation)

Each chunk's logits are recomputed (a GEMM), except the first chunk's on the Triton path with
autograd on: the forward keeps them (fp16 on GPU, relative to each forward tile's row maximum) in
the buffer the backward then uses for its gradient chunks, and the backward turns them into that
chunk's gradient in place with a memory-bound kernel. At (N=16384, H=896) that is 13824 of 151936
columns, and 2-3% of the forward + backward time.
Chunks run over the vocabulary rather than the tokens so that grad_W needs no fp32 accumulator
([V, H] fp32 would cost more memory than the logits chunk); grad_h [N, H] is accumulated in fp32.
Extra memory: the [N, chunk] buffer and the fp32 [N, H] accumulator within EXTRA_BYTES (460 MiB)
when chunk_size is None, and in the forward 3 x N x V_local / BLOCK_N fp32 tile statistics (freed
before the kept chunk is allocated).

Paths (`impl`, see `dispatch.py`): "triton" = `logprob_triton` (GEMM with fused online-softmax
epilogue in forward, GEMM with fused gradient epilogue + cuBLAS grad GEMMs in backward; bf16/fp16
on CUDA, any dtype on CPU under TRITON_INTERPRET=1); "torch" = the same chunked algorithm with
torch matmuls in fp32 (also what "auto" takes for fp32 inputs on CUDA).
Reference: `logprob_reference.reference_logprob_entropy`. Simplifications: hidden must be
replicated over tp_group (no sequence-parallel input); labels must be valid ids (no ignore_index).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from verl_mega.kernels.dispatch import resolve_impl

NEG = -1.0e30  # finite "minus infinity" for empty statistics (see logprob_triton)
# Extra memory budget of a call when chunk_size is None: the [N, chunk] buffer (kept logits, then
# gradient chunks) plus the fp32 [N, H] grad_h accumulator.
EXTRA_BYTES = 460 * 2**20
KEEP_FIRST_CHUNK = True  # Triton path with gradients: the forward keeps the first chunk's logits


@dataclass(frozen=True)
class _Spec:
    group: object  # tp process group or None
    tp: int
    vocab_start: int
    n_valid: int  # local columns that are real vocabulary (the rest is padding)
    inv_temp: float
    vocab: int  # true vocabulary size (labels must lie below it)
    chunk_size: int | None
    path: str  # "triton" | "torch"
    compute_entropy: bool
    keep_first_chunk: bool = False  # Triton path with autograd on: the forward keeps chunk 0's logits


def fused_logprob_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, tp_group=None,
                          vocab_start: int | None = None, true_vocab_size: int | None = None,
                          temperature: float = 1.0, compute_entropy: bool = True, chunk_size: int | None = None,
                          impl: str = "auto", check_labels: bool = True):
    """Log-prob of `labels` and entropy under softmax(hidden @ weight.T / temperature), vocab-parallel.

    hidden [..., H] (replicated over tp_group; its gradient is summed over the group),
    weight [V_local, H] this rank's vocab rows (same dtype as hidden), labels [...] global ids.
    vocab_start: first global id of this shard (default tp_rank * V_local);
    true_vocab_size: ids >= it are padding (default V_local * tp); chunk_size: vocab columns per
    backward chunk (default: the [N, chunk] buffer and the fp32 grad_h within EXTRA_BYTES, see
    `_chunk`; rounded up to a multiple of 16 on the Triton path, which also needs H * itemsize to be
    a multiple of 16 bytes, else "auto" takes the torch path). With autograd on, the Triton path
    keeps the first chunk's logits from the forward to the backward (that buffer, ~0.45 GiB at most
    by default). check_labels: ValueError for a label outside [0, true_vocab_size); on CUDA the host then waits
    for the GPU to reach this call (whatever was queued before it, e.g. the model's forward, drains first): pass
    False where the ids were checked already (the trainer checks its batches' ids on the host,
    `RLBatch.microbatches(vocab=...)`). Returns (logprob [...] fp32, entropy [...] fp32 or None); differentiable
    w.r.t. hidden and weight.
    """
    spec = _make_spec(hidden, weight, labels, tp_group, vocab_start, true_vocab_size, temperature,
                      compute_entropy, chunk_size, impl)
    check = _LabelRangeCheck(labels, spec.vocab) if check_labels else None
    lead = hidden.shape[:-1]
    logprob, entropy = _FusedLogProbEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight,
                                                  labels.reshape(-1), spec)
    if check is not None:
        check.raise_if_bad()
    return logprob.view(lead), (entropy.view(lead) if compute_entropy else None)


def warm_up_logprob_kernels(weight: torch.Tensor, *, impl: str = "auto") -> int:
    """Compile, before a run's first step, every Triton variant the fused log-prob can meet with this LM-head shard
    (weight [V_local, H], read only: its gradient is not touched); otherwise the first short micro-batch of a kind
    compiles one inside a step (`_fwd_kernel`, 0.6 s of a measured step in benchmarks/results/h100_2026-12-07i).
    Returns the calls made (`launch_each_regime`): 0 off CUDA (the CPU interpreter compiles nothing, and its calls
    are slow) and where the Triton path does not apply (fp32, rows not 16-byte aligned)."""
    return launch_each_regime(weight, impl=impl) if weight.is_cuda else 0


def launch_each_regime(weight: torch.Tensor, *, impl: str = "auto") -> int:
    """The fused log-prob on `weight` at one token count in each regime of the Triton kernels' launch choices
    (`logprob_triton.warm_token_counts`): forward-only without entropy (the log-prob passes) and with gradients of
    the log-probs alone and of log-probs + entropies (the update, with and without an entropy bonus), on zeros.
    Returns the calls made: 0 where the Triton path does not apply."""
    probe = weight.new_zeros(1, weight.shape[1])
    one = torch.zeros(1, dtype=torch.long, device=weight.device)
    if _make_spec(probe, weight, one, None, 0, weight.shape[0], 1.0, True, None, impl).path != "triton":
        return 0
    from verl_mega.kernels import logprob_triton

    w, calls = weight.detach(), 0
    for n in logprob_triton.warm_token_counts():
        hidden, labels = weight.new_zeros(n, weight.shape[1]), torch.zeros(n, dtype=torch.long, device=weight.device)
        with torch.no_grad():
            fused_logprob_entropy(hidden, w, labels, compute_entropy=False, impl=impl)
        for with_entropy in (False, True):
            h = hidden.clone().requires_grad_()
            lp, ent = fused_logprob_entropy(h, w, labels, impl=impl)
            (lp.sum() + ent.sum() if with_entropy else lp.sum()).backward()
        calls += 3
    return calls


class _LabelRangeCheck:
    """labels in [0, vocab), checked without stalling the GPU queue.

    On CUDA the min/max are copied to pinned host memory behind an event, and read once the
    forward kernels are queued: the host waits only for the GPU to reach the copy, never for the
    forward itself, so the next kernels keep being queued. (The kernels are memory-safe with bad
    labels: an id off the shard reads no weight row; the error is raised before any result is used.)
    """

    def __init__(self, labels: torch.Tensor, vocab: int):
        self.vocab, self.event, self.host = vocab, None, None
        if labels.numel():
            lo_hi = torch.empty(2, dtype=labels.dtype, device=labels.device)
            torch.aminmax(labels.reshape(-1), out=(lo_hi[0], lo_hi[1]))
            if labels.is_cuda:
                self.host = torch.empty(2, dtype=lo_hi.dtype, pin_memory=True)
                self.host.copy_(lo_hi, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record()
            else:
                self.host = lo_hi
                self.raise_if_bad()

    def raise_if_bad(self):
        if self.host is None:
            return
        if self.event is not None:
            self.event.synchronize()
        lo, hi = (int(x) for x in self.host.tolist())
        if lo < 0 or hi >= self.vocab:
            raise ValueError(f"labels must lie in [0, true_vocab_size={self.vocab}), got [{lo}, {hi}]")


def _make_spec(hidden, weight, labels, tp_group, vocab_start, true_vocab_size, temperature, compute_entropy,
               chunk_size, impl) -> _Spec:
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., H] and weight [V_local, H] disagree: {tuple(hidden.shape)} vs "
                         f"{tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if labels.shape != hidden.shape[:-1] or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be integer ids of shape {tuple(hidden.shape[:-1])}, got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    v_local = weight.shape[0]
    if vocab_start is None:
        vocab_start = (dist.get_rank(tp_group) if tp > 1 else 0) * v_local
    vocab = v_local * tp if true_vocab_size is None else true_vocab_size
    n_valid = max(0, min(v_local, vocab - vocab_start))
    if vocab_start < 0 or (tp == 1 and n_valid == 0):
        raise ValueError(f"vocab_start={vocab_start} leaves no vocabulary on this shard (true_vocab_size={vocab})")
    path = resolve_impl(impl, hidden)
    if path == "triton" and hidden.is_cuda and hidden.dtype == torch.float32:
        if impl == "triton":
            raise ValueError("the Triton path takes bf16/fp16 inputs on CUDA; fp32 inputs take impl='torch'")
        path = "torch"  # auto: fp32 on CUDA -> cuBLAS fp32 GEMMs in the chunked torch path
    if path == "triton" and (hidden.shape[-1] * hidden.element_size()) % 16:
        if impl == "triton":
            raise ValueError(f"impl='triton' needs hidden rows of a multiple of 16 bytes (TMA), "
                             f"got H={hidden.shape[-1]}")
        path = "torch"  # auto: TMA descriptors need 16-byte aligned rows
    if path == "triton" and chunk_size is not None:
        chunk_size = -(-chunk_size // 16) * 16  # the gradient chunk's rows must stay 16-byte aligned too
    # Inside autograd.Function.forward grad mode is off and needs_input_grad ignores it: decide here.
    keep = (path == "triton" and KEEP_FIRST_CHUNK and torch.is_grad_enabled()
            and (hidden.requires_grad or weight.requires_grad))
    return _Spec(tp_group, tp, vocab_start, n_valid, 1.0 / temperature, vocab, chunk_size, path, compute_entropy,
                 keep)


class _FusedLogProbEntropy(torch.autograd.Function):
    """(hidden [N, H], weight [V_local, H], labels [N]) -> (logprob [N], entropy [N]), fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, spec: _Spec):
        h, w = _aligned(hidden), _aligned(weight)
        # Triton: the kernels take the global ids (int32: cheaper compares in the backward tile,
        # exact since ids are below the vocabulary size) and the shard's offset; torch: local columns.
        local = labels.to(torch.int32).contiguous() if spec.path == "triton" else _local_columns(labels, spec)
        *stats, ctx.kept = _local_stats(h, w[:spec.n_valid], local, spec)
        lse, ez, zt = _combine_over_group(*stats, spec)
        ctx.spec = spec
        ctx.save_for_backward(h, w, local, lse, ez, zt)
        ctx.set_materialize_grads(False)
        return zt - lse, lse - ez

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        h, w, local, lse, ez, zt = ctx.saved_tensors
        spec = ctx.spec
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        g_lp = torch.zeros_like(lse) if g_lp is None else g_lp.float().contiguous()
        g_ent = g_ent.float().contiguous() if (g_ent is not None and spec.compute_entropy) else None
        kept, ctx.kept = ctx.kept, None  # consumed (overwritten): a second backward recomputes
        grad_h, grad_w = _backward_chunks(h, w, local, lse, ez, zt, g_lp, g_ent, spec, need_h, need_w, kept)
        del kept  # its buffer goes before grad_h's conversion below
        if grad_h is not None:
            if spec.tp > 1:
                dist.all_reduce(grad_h, group=spec.group)
            grad_h = grad_h.to(h.dtype)
        return grad_h, grad_w, None, None


def _local_stats(h, w, local, spec: _Spec):
    """(m, s, u, zt, kept): fp32 [N] statistics over this shard's valid columns w [n_valid, H], and
    the logits of the first backward chunk kept for the backward (spec.keep_first_chunk), else None.

    `local`: on the Triton path the global label ids, else their local columns (-1: elsewhere).
    """
    n, v = h.shape[0], w.shape[0]
    if spec.path == "triton":
        from verl_mega.kernels import logprob_triton
        if v == 0:
            return (torch.full((n,), NEG, device=h.device), *torch.zeros(3, n, device=h.device), None)
        cols, width = _chunk_width(spec, h, v, keep=True) if spec.keep_first_chunk else (0, 0)
        return logprob_triton.forward_stats(h, w, local, spec.vocab_start, spec.inv_temp, cols, width)
    return (*_torch_stats(h, w, local, spec), None)


def _torch_stats(h, w, local, spec: _Spec):
    """Chunked torch version of the forward statistics (fp32 matmuls, online rescaling)."""
    n, v = h.shape[0], w.shape[0]
    m = torch.full((n,), NEG, device=h.device)
    s, u, zt = torch.zeros(3, n, device=h.device)
    hf = h.float()
    chunk = _chunk(spec, n, v, 4, h.shape[1])
    for c0 in range(0, v, chunk):
        z = (hf @ w[c0:c0 + chunk].float().t()) * spec.inv_temp  # [N, chunk]
        m_c = z.amax(dim=1)
        d = z - m_c[:, None]
        e = d.exp()
        s_c, u_c = e.sum(dim=1), (e * d).sum(dim=1)
        m_new = torch.maximum(m, m_c)
        a, b = (m - m_new).exp(), (m_c - m_new).exp()
        u = a * (u + (m - m_new) * s) + b * (u_c + (m_c - m_new) * s_c)
        s = a * s + b * s_c
        m = m_new
        col = local.long() - c0
        here = (col >= 0) & (col < z.shape[1])
        zt = torch.where(here, z.gather(1, col.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), zt)
    return m, s, u, zt


def _combine_over_group(m, s, u, zt, spec: _Spec):
    """Merge per-shard statistics over tp_group; returns (lse, E_p[z], label logit), fp32 [N]."""
    if spec.tp > 1:
        m_all = m.clone()
        dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=spec.group)
        scale = (m - m_all).exp()
        parts = torch.stack([s * scale, (u + (m - m_all) * s) * scale, zt])  # [3, N]
        dist.all_reduce(parts, group=spec.group)
        m, (s, u, zt) = m_all, parts
    lse = m + s.log()
    return lse, m + u / s, zt


def _chunk_width(spec: _Spec, h: torch.Tensor, v: int, keep: bool) -> tuple[int, int]:
    """(vocab columns per backward chunk, their buffer's width: rounded up to 16 columns, so that the
    buffer's rows stay 16-byte aligned for TMA). keep: the forward keeps the first chunk's logits."""
    low = spec.path == "triton" and h.is_cuda
    elem = h.element_size() if low else 4
    sms = torch.cuda.get_device_properties(h.device).multi_processor_count if low else 0
    chunk = min(_chunk(spec, h.shape[0], max(v, 1), elem, h.shape[1], sms, keep), max(v, 1))
    return chunk, -(-chunk // 16) * 16


def _backward_chunks(h, w, local, lse, ez, zt, g_lp, g_ent, spec: _Spec, need_h: bool, need_w: bool, kept=None):
    """Gradients chunk by chunk over the valid local vocab; return (grad_h fp32, grad_w).

    Each chunk's logits are recomputed, except those of the first chunk when the forward kept them
    (`kept`, Triton path): that chunk's gradient is computed from them in place, and their buffer
    then serves the other chunks."""
    n, hid = h.shape
    v = spec.n_valid
    # On CUDA the Triton path keeps the gradient chunk in the input dtype and lets cuBLAS run the
    # GEMMs in bf16/fp16 with fp32 accumulation; elsewhere everything is fp32.
    low = spec.path == "triton" and h.is_cuda
    gdtype = h.dtype if low else torch.float32
    hc = h if low else h.float()
    if kept is not None:  # the kept logits' buffer [N, >= chunk], then the gradient chunks
        assert kept.values.element_size() == torch.finfo(gdtype).bits // 8
        chunk, buf = kept.cols, kept.values.view(gdtype)
    else:
        chunk, width = _chunk_width(spec, h, v, keep=False)
        buf = torch.empty(n, width, dtype=gdtype, device=h.device)  # [N, chunk (+ padding)]
    # The first chunk writes grad_h (no memset, no read of zeros), the others add to it.
    grad_h = (torch.empty if v > 0 else torch.zeros)(n, hid, dtype=torch.float32, device=h.device) if need_h else None
    grad_w = torch.empty_like(w) if need_w else None
    if need_w and v < w.shape[0]:
        grad_w[v:].zero_()  # padding rows
    for c0 in range(0, v, chunk):
        wc = w[c0:min(c0 + chunk, v)]
        g = buf[:, :wc.shape[0]]
        if spec.path == "triton":
            from verl_mega.kernels import logprob_triton
            if c0 == 0 and kept is not None:
                logprob_triton.kept_grad_logits(kept, g, lse, ez, g_lp, g_ent, local, spec.vocab_start,
                                                spec.inv_temp)
                kept = None
            else:
                logprob_triton.grad_logits(h, wc, g, lse, ez, g_lp, g_ent, local, zt, spec.vocab_start + c0,
                                           spec.inv_temp)
        else:
            _torch_grad_logits(hc, wc, g, lse, ez, g_lp, g_ent, local.long() - c0, spec.inv_temp)
        wc = wc if low else wc.float()
        if need_h:
            _addmm_fp32(grad_h, g, wc, first=c0 == 0)
        if need_w:
            if low:
                torch.mm(g.t(), hc, out=grad_w[c0:c0 + wc.shape[0]])
            else:
                grad_w[c0:c0 + wc.shape[0]] = (g.t() @ hc).to(w.dtype)
    return grad_h, grad_w


def _torch_grad_logits(hf, wc, out, lse, ez, g_lp, g_ent, col, inv_temp):
    """out [N, chunk] = dL/d(raw logits) for the columns wc (torch, fp32)."""
    z = (hf @ wc.float().t()) * inv_temp  # [N, chunk]
    p = (z - lse[:, None]).exp()
    g = -g_lp[:, None] * p
    if g_ent is not None:
        g -= g_ent[:, None] * p * (z - ez[:, None])
    rows = torch.nonzero((col >= 0) & (col < z.shape[1])).squeeze(1)
    g[rows, col[rows]] += g_lp[rows]
    out.copy_(g * inv_temp)


_OUT_DTYPE_MM = [True]  # does torch.addmm accept out_dtype= here? (CUDA, torch >= 2.8)


def _addmm_fp32(acc, a, b, first: bool = False):
    """acc += a @ b (acc = a @ b if `first`: acc's old values are not read) with fp32 accumulation
    into the fp32 `acc`, whatever the dtype of a and b."""
    beta = 0.0 if first else 1.0
    if a.dtype == torch.float32:
        acc.addmm_(a, b, beta=beta)
        return
    if _OUT_DTYPE_MM[0]:
        try:
            torch.addmm(acc, a, b, beta=beta, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):
            _OUT_DTYPE_MM[0] = False
    # Fallback: the chunk's product is rounded to the input dtype before accumulating.
    if first:
        acc.copy_(a @ b)
    else:
        acc += a @ b


def _chunk(spec: _Spec, n: int, v: int, elem_bytes: int, hid: int, num_sms: int = 0, keep: bool = False) -> int:
    """Vocab columns per backward chunk: the [n, chunk] buffer plus what the fp32 [n, hid] grad_h
    accumulator takes beyond the returned gradient within EXTRA_BYTES (at least 256 columns).

    With `num_sms` (the GPU's multiprocessor count), among widths from half the budget up to the
    budget the one with the fewest waves of the persistent gradient kernel (128 x 256 tiles),
    summed over the recomputed chunks (all but the first when the forward keeps it: `keep`), the
    widest among equals. Without keeping, n=16384 on 132 SMs takes 8448 = 33 x 256 columns (4224
    tiles = 32 full waves per chunk, where 8192 leaves a last wave of 4 tiles); keeping, the widest
    chunk wins (more columns kept, fewer recomputed).
    """
    if spec.chunk_size is not None:
        return spec.chunk_size
    budget = EXTRA_BYTES - n * hid * 2
    cap = max(256, min(v, budget // (max(n, 1) * elem_bytes) // 256 * 256))
    if num_sms <= 0 or cap >= v:
        return cap
    rows = -(-n // 128)

    def wave_slots(width):  # waves of the gradient kernel over the recomputed chunks
        full, last = divmod(v, width)
        tiles = [rows * -(-width // 256)] * full + ([rows * -(-last // 256)] if last else [])
        return sum(-(-t // num_sms) for t in tiles[1 if keep else 0:])
    widths = range(cap, max(256, cap // 2) - 1, -256)
    return min(widths, key=lambda c: (wave_slots(c), -c))


def _aligned(x: torch.Tensor) -> torch.Tensor:
    """Contiguous, with a 16-byte aligned start (TMA descriptors need it; a fresh allocation has it)."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def _local_columns(labels: torch.Tensor, spec: _Spec) -> torch.Tensor:
    """int32 [N]: each label's column in this shard's valid vocabulary, -1 where it is elsewhere."""
    local = labels.to(torch.int64) - spec.vocab_start
    return torch.where((local >= 0) & (local < spec.n_valid), local, -1).to(torch.int32)
