"""Causal attention over packed variable-length sequences ("remove padding").

Several sequences are concatenated into one row of T = sum(lengths) tokens; `cu_seqlens` [N + 1]
(int32, cu_seqlens[0] = 0, cu_seqlens[-1] = T) marks where each starts. Each query attends causally to
the keys of its own sequence only, so no FLOP is spent on padding and no [T, T] mask is built.

Kernels (`varlen_attend` picks one):
- "varlen": torch's flash-attention varlen kernel (`torch.nn.attention.varlen.varlen_attn`, torch >= 2.9),
  CUDA with bf16/fp16 only; GQA natively (`enable_gqa`).
- "flex": `torch.nn.attention.flex_attention` with a document-causal block mask (compiled; CUDA).
- "loop": one SDPA call per sequence (`is_causal`). Exact and FLOP-free on padding, but one kernel launch
  per sequence: the CPU path (tests, fp32) and the fallback where the others are unavailable.
`benchmarks/varlen_attention.py` measures them against padded SDPA; "auto" takes "varlen" where it
runs (CUDA, half precision; if it raises for a (head_dim, causal, dtype) case, a warning and "loop" for
that case from then on), else "loop".
Not yet measured on the GPU from this branch (no device was lent): the integrator's run of the
benchmark decides whether "flex" should replace "varlen" in "auto".

Reference: FlashAttention-2 `flash_attn_varlen_func` (Dao, 2023), as used by verl/OpenRLHF "remove padding".
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

try:  # torch >= 2.9; the keyword set changed between releases: read it once
    from torch.nn.attention.varlen import varlen_attn
    _VARLEN_PARAMS = set(inspect.signature(varlen_attn).parameters)
except ImportError:  # pragma: no cover - older torch
    varlen_attn, _VARLEN_PARAMS = None, set()

KERNELS = ("auto", "varlen", "flex", "loop")


@dataclass(frozen=True)
class PackedSeqs:
    """Boundaries of the sequences packed into one row: cu_seqlens [N + 1] int32 (on the data's device),
    max_seqlen (the longest length, a Python int), lengths (Python ints, for the per-sequence loop)."""

    cu_seqlens: torch.Tensor
    max_seqlen: int
    lengths: tuple[int, ...]
    cache: dict = field(default_factory=dict, compare=False, repr=False)  # per-forward data (flex block mask)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, device: torch.device | str | None = None) -> "PackedSeqs":
        """From offsets cu_seqlens [N + 1] (any integer dtype), with the tensor on `device` (default: where it is).

        The lengths are read on the host: keep cu_seqlens there (the trainer's packed micro-batches do) and
        nothing waits for the GPU; a GPU tensor costs one sync. A host tensor goes to a CUDA `device` through
        pinned memory, without blocking."""
        lengths = tuple((cu_seqlens[1:] - cu_seqlens[:-1]).tolist())
        cu = cu_seqlens.to(torch.int32)
        if device is not None:
            if cu.device.type == "cpu" and torch.device(device).type == "cuda":
                cu = cu.pin_memory()
            cu = cu.to(device, non_blocking=True)  # a no-op where it already is
        return cls(cu, max(lengths, default=0), lengths)


def varlen_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: PackedSeqs,
                  kernel: str = "auto", causal: bool = True) -> torch.Tensor:
    """Document-causal attention: q [1, Hq, T, D], k/v [1, Hkv, T, D] (Hq a multiple of Hkv) -> [1, T, Hq*D].

    Query i of sequence j attends to keys cu_seqlens[j] .. i; with `causal=False` to every key of
    sequence j (bidirectional, e.g. the vision tower's windows). `kernel`: see the module docstring."""
    if kernel not in KERNELS:
        raise ValueError(f"varlen attention kernel {kernel!r} is not one of {KERNELS}")
    _, hq, t, d = q.shape
    if kernel == "auto":
        case = (d, causal, q.dtype)  # a failure is remembered per case: the vision tower's head size or
        if _varlen_ok(q) and case not in _BROKEN:  # bidirectional call must not slow the text model down
            try:
                return _varlen(q, k, v, seqs, causal)
            except (RuntimeError, TypeError, NotImplementedError) as exc:  # e.g. a GPU the kernel does not support
                _BROKEN.add(case)
                warnings.warn(f"varlen flash attention failed for head_dim {d}, causal={causal}, {q.dtype} "
                              f"({type(exc).__name__}: {exc}); packed attention of this shape falls back to one "
                              f"SDPA call per sequence", stacklevel=2)
        kernel = "loop"
    if kernel == "varlen":
        if not _varlen_ok(q):
            raise ValueError(f"varlen attention kernel 'varlen' needs CUDA and bf16/fp16 (got {q.device}, {q.dtype})")
        return _varlen(q, k, v, seqs, causal)
    if kernel == "flex":
        out = _flex(q, k, v, seqs, causal)  # [1, heads, T, head_dim]
    else:
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=causal,
                                                        enable_gqa=hq != k.shape[1])
                         for a, b in _bounds(seqs)], dim=2)  # [1, heads, T, head_dim]
    return out.transpose(1, 2).reshape(1, t, hq * d)


_BROKEN: set = set()  # (head_dim, causal, dtype) cases where the varlen kernel raised ("auto" stops trying them)


def _varlen(q, k, v, seqs: PackedSeqs, causal: bool = True) -> torch.Tensor:
    """torch's varlen flash attention: [1, heads, T, D] in, [1, T, heads * D] out."""
    _, hq, t, d = q.shape
    hkv = k.shape[1]
    q, k, v = (x[0].transpose(0, 1) for x in (q, k, v))  # [T, heads, head_dim]
    kwargs = {}
    if "window_size" in _VARLEN_PARAMS:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)  # (-1, 0): causal; (-1, -1): no limit
    else:
        kwargs["is_causal"] = causal
    if hq != hkv:
        if "enable_gqa" in _VARLEN_PARAMS:
            kwargs["enable_gqa"] = True
        else:  # older signature: give every query head its own K/V copy
            k, v = (x.repeat_interleave(hq // hkv, dim=1) for x in (k, v))
    out = varlen_attn(q, k, v, seqs.cu_seqlens, seqs.cu_seqlens, seqs.max_seqlen, seqs.max_seqlen, **kwargs)
    return out.reshape(1, t, hq * d)


def _bounds(seqs: PackedSeqs) -> list[tuple[int, int]]:
    out, start = [], 0
    for n in seqs.lengths:
        out.append((start, start + n))
        start += n
    return out


def _varlen_ok(q: torch.Tensor) -> bool:
    return varlen_attn is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


_FLEX_CACHE: dict = {}


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: PackedSeqs, causal: bool = True) -> torch.Tensor:
    """flex_attention with a document(-causal) block mask (the compiled kernel is built once per process)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _FLEX_CACHE:
        _FLEX_CACHE["fn"] = torch.compile(flex_attention, dynamic=True)
    t = q.shape[2]
    key = ("block_mask", causal)
    if key not in seqs.cache:  # once per forward, shared by the layers
        doc = torch.repeat_interleave(torch.arange(len(seqs.lengths), device=q.device),
                                      torch.tensor(seqs.lengths, device=q.device))  # [T] sequence id per token

        def document_causal(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki)

        def document(b, h, qi, ki):
            return doc[qi] == doc[ki]

        seqs.cache[key] = create_block_mask(document_causal if causal else document, None, None, t, t,
                                            device=q.device)
    return _FLEX_CACHE["fn"](q, k, v, block_mask=seqs.cache[key], enable_gqa=q.shape[1] != k.shape[1])
