"""varlen_attend's "auto" fallback: a kernel failure for one (head_dim, causal, dtype) case sends only that
case to the per-sequence SDPA loop. The CUDA kernel cannot run here, so `_varlen_ok` / `_varlen` are replaced:
this tests the fallback policy, not the kernel (the kernel is benchmarked on the GPU)."""

import warnings

import torch
import torch.nn.functional as F

from verl_mega.models import varlen_attention as va


def _loop_reference(q, k, v, causal):
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # one sequence: the loop path's result
    return out.transpose(1, 2).reshape(1, q.shape[2], -1)


def test_a_failed_case_falls_back_alone(monkeypatch):
    calls = []

    def fake_varlen(q, k, v, seqs, causal=True):
        calls.append((q.shape[-1], causal))
        if q.shape[-1] == 8 and not causal:  # e.g. the vision tower's bidirectional head size is unsupported
            raise RuntimeError("unsupported head_dim")
        return torch.full((1, q.shape[2], q.shape[1] * q.shape[3]), 7.0)

    monkeypatch.setattr(va, "_varlen_ok", lambda q: True)
    monkeypatch.setattr(va, "_varlen", fake_varlen)
    monkeypatch.setattr(va, "_BROKEN", set())
    seqs = va.PackedSeqs.from_cu_seqlens(torch.tensor([0, 5]))
    g = torch.Generator().manual_seed(0)
    q8, k8, v8 = (torch.randn(1, 2, 5, 8, generator=g) for _ in range(3))
    q4, k4, v4 = (torch.randn(1, 2, 5, 4, generator=g) for _ in range(3))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = va.varlen_attend(q8, k8, v8, seqs, causal=False)  # fails -> loop result, one warning
    assert torch.allclose(out, _loop_reference(q8, k8, v8, False), atol=1e-6)
    assert sum("head_dim 8" in str(w.message) for w in caught) == 1
    out = va.varlen_attend(q8, k8, v8, seqs, causal=False)  # the failed case is not retried
    assert torch.allclose(out, _loop_reference(q8, k8, v8, False), atol=1e-6)
    assert calls == [(8, False)]
    assert torch.equal(va.varlen_attend(q4, k4, v4, seqs), torch.full((1, 5, 8), 7.0))  # other cases keep the kernel
    assert torch.equal(va.varlen_attend(q8, k8, v8, seqs, causal=True), torch.full((1, 5, 16), 7.0))
    assert calls == [(8, False), (4, True), (8, True)]
