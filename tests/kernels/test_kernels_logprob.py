"""Fused log-prob + entropy vs the materialised-logits reference: values and both gradients.

Runs the torch chunked path and the Triton path (interpreter on CPU, compiled on CUDA) at tp=1, and
both at tp=2 over gloo against the unsharded reference. Tolerances: fp32 inputs 1e-4 (relative to
the largest reference value) on CPU, 2e-3 on CUDA; bf16 inputs (fp32 accumulation, bf16 gradient
chunk and bf16 grads out) 1e-4 for log-prob/entropy on CPU and 2e-2 elsewhere.
"""

import pytest
import torch

from verl_mega.kernels import fused_logprob_entropy, reference_logprob_entropy
from verl_mega.testing import run_distributed

CUDA = torch.cuda.is_available()
IMPL_DEVICES = [("torch", "cpu"), ("triton", "cuda"), ("torch", "cuda")] if CUDA else \
    [("torch", "cpu"), ("triton", "cpu")]


def _inputs(n, h, v, dtype, device, true_vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.3).to(dtype)
    labels = torch.randint(0, true_vocab, (n,), generator=g)
    g_lp, g_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    return [t.to(device) for t in (hidden, weight, labels, g_lp, g_ent)]


def _run(fn, hidden, weight, labels, g_lp, g_ent, **kw):
    """Values and gradients of sum(g_lp * logprob + g_ent * entropy) (fp32, on CPU)."""
    hidden = hidden.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    lp, ent = fn(hidden, weight, labels, **kw)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    return [t.detach().float().cpu() for t in (lp, ent, hidden.grad, weight.grad)]


def _max_rel_err(out, ref):
    return [float((a - b).abs().max() / b.abs().max().clamp_min(1e-6)) for a, b in zip(out, ref)]


# fp32 inputs: the Triton path runs in the interpreter only (on CUDA, fp32 takes the torch path).
FP32_IMPL_DEVICES = [(i, d) for i, d in IMPL_DEVICES if (i, d) != ("triton", "cuda")]


@pytest.mark.parametrize("impl,device", FP32_IMPL_DEVICES)
def test_fp32_matches_reference_with_padding_temperature_chunks(impl, device):
    # V=150 local columns of which 131 are real; chunk_size=64 forces three backward chunks.
    hidden, weight, labels, g_lp, g_ent = _inputs(37, 48, 150, torch.float32, device, 131)
    kw = dict(true_vocab_size=131, temperature=0.7)
    out = _run(fused_logprob_entropy, hidden, weight, labels, g_lp, g_ent, impl=impl, chunk_size=64, **kw)
    ref = _run(reference_logprob_entropy, hidden.cpu(), weight.cpu(), labels.cpu(), g_lp.cpu(), g_ent.cpu(), **kw)
    tol = 2e-3 if device == "cuda" else 1e-4
    assert max(_max_rel_err(out, ref)) < tol, _max_rel_err(out, ref)
    assert out[3][131:].abs().max() == 0  # padding rows of the weight get no gradient
    assert (out[0] <= 0).all() and (out[1] >= 0).all()


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
@pytest.mark.parametrize("chunk_size", [None, 64])
def test_bf16_inputs_fp32_accumulation(impl, device, chunk_size):
    # 300 rows of the weight, 283 of them real vocabulary; chunk 64 gives five backward chunks.
    hidden, weight, labels, g_lp, g_ent = _inputs(40, 64, 300, torch.bfloat16, device, 283, seed=1)
    kw = dict(true_vocab_size=283, temperature=1.3)
    out = _run(fused_logprob_entropy, hidden, weight, labels, g_lp, g_ent, impl=impl, chunk_size=chunk_size, **kw)
    ref = _run(reference_logprob_entropy, hidden.cpu(), weight.cpu(), labels.cpu(), g_lp.cpu(), g_ent.cpu(), **kw)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    err = _max_rel_err(out, ref)
    assert max(err[:2]) < (1e-4 if device == "cpu" else 2e-2), err
    assert max(err[2:]) < 2e-2, err
    assert out[3][283:].abs().max() == 0


def test_leading_dims_no_entropy_and_logprob_only_grad():
    # [B, T, H] input; entropy off; only log-prob feeds the loss; no_grad works too.
    hidden, weight, labels, g_lp, _ = _inputs(24, 32, 96, torch.float32, "cpu", 96, seed=2)
    lp, ent = fused_logprob_entropy(hidden.view(4, 6, 32), weight, labels.view(4, 6), compute_entropy=False)
    assert ent is None and lp.shape == (4, 6)
    h = hidden.clone().requires_grad_()
    lp, _ = fused_logprob_entropy(h, weight, labels, impl="torch")
    (lp * g_lp).sum().backward()
    h_ref = hidden.clone().requires_grad_()
    lp_ref, _ = reference_logprob_entropy(h_ref, weight, labels)
    (lp_ref * g_lp).sum().backward()
    torch.testing.assert_close(h.grad, h_ref.grad, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(fused_logprob_entropy(hidden, weight, labels)[0], lp_ref.detach())


def test_bad_inputs_raise():
    hidden, weight, labels, _, _ = _inputs(8, 16, 32, torch.float32, "cpu", 32)
    with pytest.raises(ValueError, match="labels must lie"):
        fused_logprob_entropy(hidden, weight, labels + 32)
    with pytest.raises(ValueError, match="labels must lie"):
        fused_logprob_entropy(hidden, weight, labels.clamp_min(20), true_vocab_size=20)
    with pytest.raises(ValueError, match="same dtype"):
        fused_logprob_entropy(hidden.bfloat16(), weight, labels)
    with pytest.raises(ValueError, match="disagree"):
        fused_logprob_entropy(hidden[:, :8], weight, labels)
    with pytest.raises(ValueError, match="impl must be"):
        fused_logprob_entropy(hidden, weight, labels, impl="cuda")
    with pytest.raises(ValueError, match="temperature"):
        fused_logprob_entropy(hidden, weight, labels, temperature=0.0)
    if CUDA:
        with pytest.raises(ValueError, match="bf16/fp16"):
            fused_logprob_entropy(hidden.cuda(), weight.cuda(), labels.cuda(), impl="triton")


def _tp_worker(impls, cases):
    """Each rank holds its vocab shard; compare with the unsharded reference on the full weight."""
    import torch.distributed as dist

    from verl_mega.parallel import Layout
    from verl_mega.parallel.dist import init_distributed
    init_distributed(backend="gloo")  # CPU tensors, also on a GPU machine (which would pick NCCL)
    layout = Layout.create(tp=2, pp=1)
    rank, results = layout.tp_rank, []
    for n, h, v_local, true_vocab, temp in cases:
        hidden, weight, labels, g_lp, g_ent = _inputs(n, h, 2 * v_local, torch.float32, "cpu", true_vocab, seed=3)
        ref = _run(reference_logprob_entropy, hidden, weight, labels, g_lp, g_ent, true_vocab_size=true_vocab,
                   temperature=temp)
        ref[3] = ref[3][rank * v_local:(rank + 1) * v_local]  # this rank's rows of the weight gradient
        shard = weight[rank * v_local:(rank + 1) * v_local]
        kw = dict(tp_group=layout.tp_group, true_vocab_size=true_vocab, temperature=temp)
        for impl in impls:
            out = _run(fused_logprob_entropy, hidden, shard, labels, g_lp, g_ent, impl=impl, chunk_size=32, **kw)
            results.append((impl, (n, v_local, true_vocab), _max_rel_err(out, ref)))
        # The reference itself, sharded (gather of the logits), agrees with the unsharded one.
        out = _run(reference_logprob_entropy, hidden, shard, labels, g_lp, g_ent, **kw)
        results.append(("reference-tp", (n, v_local, true_vocab), _max_rel_err(out, ref)))
    dist.barrier()
    return results


def test_tp2_over_gloo_matches_unsharded_reference():
    # Case 1: padding on rank 1 only; case 2: rank 1 holds only padding columns (n_valid = 0).
    cases = [(19, 32, 80, 150, 0.8), (9, 16, 40, 37, 1.0)]
    # gloo ranks on CPU tensors, Triton in the interpreter (also on a GPU machine).
    env = {"TRITON_INTERPRET": "1"}
    results = run_distributed(_tp_worker, 2, ["torch", "triton"], cases, env=env)
    for rank_results in results:
        assert len(rank_results) == 6
        for impl, case, err in rank_results:
            assert max(err) < 1e-4, (impl, case, err)


@pytest.mark.skipif(CUDA, reason="sets the interpreter's backward epilogue; on CUDA the autotuned configs cover both")
def test_triton_unsplit_backward_epilogue(monkeypatch):
    # The backward epilogue stores wide tiles in two halves (SPLIT=2, the interpreter default);
    # SPLIT=1 (what 128-column tiles use on GPU) must give the same gradients.
    from verl_mega.kernels import logprob_triton
    monkeypatch.setattr(logprob_triton, "INTERP_SPLIT", 1)
    hidden, weight, labels, g_lp, g_ent = _inputs(37, 48, 150, torch.float32, "cpu", 131)
    kw = dict(true_vocab_size=131, temperature=0.7)
    out = _run(fused_logprob_entropy, hidden, weight, labels, g_lp, g_ent, impl="triton", chunk_size=64, **kw)
    ref = _run(reference_logprob_entropy, hidden, weight, labels, g_lp, g_ent, **kw)
    assert max(_max_rel_err(out, ref)) < 1e-4, _max_rel_err(out, ref)


@pytest.mark.parametrize("impl,device", IMPL_DEVICES)
def test_logprob_only_gradients_without_entropy(impl, device):
    # compute_entropy=False: the kernels' no-entropy epilogue; gradients of the log-prob alone.
    hidden, weight, labels, g_lp, _ = _inputs(37, 48, 150, torch.float32 if device == "cpu" else torch.bfloat16,
                                              device, 131, seed=3)
    kw = dict(true_vocab_size=131, temperature=0.9)
    outs = []
    for fn, args in ((fused_logprob_entropy, dict(impl=impl, chunk_size=64, compute_entropy=False)), (None, {})):
        h = (hidden if fn else hidden.cpu().float()).clone().requires_grad_()
        w = (weight if fn else weight.cpu().float()).clone().requires_grad_()
        if fn:
            lp, ent = fn(h, w, labels, **args, **kw)
            assert ent is None
        else:
            lp, _ = reference_logprob_entropy(h, w, labels.cpu(), **kw)
        (lp * g_lp.to(lp.device)).sum().backward()
        outs.append([t.detach().float().cpu() for t in (lp, h.grad, w.grad)])
    err = _max_rel_err(outs[0], outs[1])
    assert max(err) < (1e-4 if device == "cpu" else 2e-2), err


def _tp_cuda_worker(cases):
    """Compiled Triton path, vocab-parallel over two ranks sharing one GPU (gloo over CUDA tensors)."""
    from verl_mega.parallel import Layout
    from verl_mega.parallel.dist import init_distributed
    init_distributed(backend="gloo")
    layout = Layout.create(tp=2, pp=1)
    rank, results = layout.tp_rank, []
    for n, h, v_local, true_vocab, temp in cases:
        hidden, weight, labels, g_lp, g_ent = _inputs(n, h, 2 * v_local, torch.bfloat16, "cpu", true_vocab, seed=4)
        ref = _run(reference_logprob_entropy, hidden.float(), weight.float(), labels, g_lp, g_ent,
                   true_vocab_size=true_vocab, temperature=temp)
        ref[3] = ref[3][rank * v_local:(rank + 1) * v_local]
        shard = weight[rank * v_local:(rank + 1) * v_local]
        out = _run(fused_logprob_entropy, hidden.cuda(), shard.cuda(), labels.cuda(), g_lp.cuda(), g_ent.cuda(),
                   tp_group=layout.tp_group, true_vocab_size=true_vocab, temperature=temp, impl="triton",
                   chunk_size=256)
        results.append(((n, v_local, true_vocab), _max_rel_err(out, ref)))
    return results


@pytest.mark.skipif(not CUDA, reason="the compiled kernels need a GPU (the interpreter twin runs on CPU above)")
def test_tp2_compiled_triton_matches_unsharded_reference():
    # Label offsets per shard and per backward chunk in the compiled kernels; rank 1 has padding.
    cases = [(300, 64, 1000, 1900, 0.9), (64, 128, 512, 1024, 1.0)]
    for rank_results in run_distributed(_tp_cuda_worker, 2, cases):
        for case, err in rank_results:
            assert max(err[:2]) < 2e-2 and max(err[2:]) < 2e-2, (case, err)


def _compiled_variants(kernel) -> int:
    """How many binaries Triton has compiled for `kernel` (its per-device kernel caches)."""
    caches = getattr(kernel, "device_caches", None)
    assert caches is not None, "triton's JITFunction has no device_caches: update this probe for this triton"
    return sum(len(cache[0]) for cache in caches.values())


@pytest.mark.skipif(not CUDA, reason="counts compiled binaries: the interpreter (CPU) compiles nothing")
def test_tile_count_does_not_recompile_the_rows_kernel():
    # The kept first chunk's width follows the row count, and with it the tile counts the rows kernel merges:
    # one compile per width (about 90 ms each on an H100) stalled packed updates for seconds. Widths 3..11 x 256
    # give tile counts that are neither 1 nor multiples of 16 (Triton's integer specialisations) whether a tile
    # is 128 or 256 columns wide: every call after the first must reuse its binaries.
    from verl_mega.kernels import logprob_triton
    hidden, weight, labels, g_lp, g_ent = _inputs(300, 64, 8192, torch.bfloat16, "cuda", 8192, seed=5)
    counts = []
    for cols in (3 * 256, 5 * 256, 7 * 256, 9 * 256, 11 * 256):
        _run(fused_logprob_entropy, hidden, weight, labels, g_lp, g_ent, impl="triton", chunk_size=cols)
        counts.append(_compiled_variants(logprob_triton._rows_kernel))
    assert counts[0] > 0 and counts == [counts[0]] * len(counts), counts


@pytest.mark.parametrize("impl,device", FP32_IMPL_DEVICES)
def test_labels_on_chunk_and_tile_edges(impl, device):
    # Labels on the first and last column of each 64-wide backward chunk and forward tile, and on the
    # last real id (the Triton path writes each label column with a separate kernel).
    hidden, weight, _, g_lp, g_ent = _inputs(12, 32, 150, torch.float32, device, 131, seed=3)
    labels = torch.tensor([0, 63, 64, 127, 128, 130, 1, 62, 65, 126, 129, 0], device=device)
    kw = dict(true_vocab_size=131, temperature=0.9)
    out = _run(fused_logprob_entropy, hidden, weight, labels, g_lp, g_ent, impl=impl, chunk_size=64, **kw)
    ref = _run(reference_logprob_entropy, hidden.cpu(), weight.cpu(), labels.cpu(), g_lp.cpu(), g_ent.cpu(), **kw)
    assert max(_max_rel_err(out, ref)) < 1e-4, _max_rel_err(out, ref)


@pytest.mark.parametrize("unmasked_min_rows", [0, 10**9])
def test_forward_unmasked_main_launch_and_masked_tail(monkeypatch, unmasked_min_rows):
    # Large N runs the columns before the last partial tile without a column mask and the rest in a
    # second, masked launch; small N one masked launch. Force each at a small shape (V=600, 583 real:
    # 512 unmasked columns on GPU, 576 in the interpreter).
    from verl_mega.kernels import logprob_triton
    monkeypatch.setattr(logprob_triton, "UNMASKED_MIN_ROWS", unmasked_min_rows)
    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    hidden, weight, labels, g_lp, g_ent = _inputs(37, 64, 600, dtype, device, 583, seed=4)
    kw = dict(true_vocab_size=583, temperature=0.8)
    out = _run(fused_logprob_entropy, hidden, weight, labels, g_lp, g_ent, impl="triton", chunk_size=256, **kw)
    ref = _run(reference_logprob_entropy, hidden.cpu(), weight.cpu(), labels.cpu(), g_lp.cpu(), g_ent.cpu(), **kw)
    err = _max_rel_err(out, ref)
    assert max(err[:2]) < (1e-4 if not CUDA else 2e-2) and max(err[2:]) < 2e-2, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_hidden_accumulator_first_chunk_ignores_old_values(dtype):
    # The backward writes grad_h with its first chunk into an uninitialised buffer (beta = 0).
    from verl_mega.kernels.logprob import _addmm_fp32
    device = "cuda" if CUDA else "cpu"
    g = torch.Generator().manual_seed(5)
    a, b, c = (torch.randn(s, generator=g).to(dtype).to(device) for s in ((8, 16), (16, 4), (16, 4)))
    acc = torch.full((8, 4), float("nan"), device=device)
    _addmm_fp32(acc, a, b, first=True)
    _addmm_fp32(acc, a, c)
    ref = a.float() @ b.float() + a.float() @ c.float()
    # bf16 on CPU takes the fallback, which rounds each product to bf16 before adding.
    assert torch.allclose(acc, ref, atol=5e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("keep", [True, False])
@pytest.mark.parametrize("chunk_size", [64, None])
def test_kept_first_chunk_matches_recomputed(monkeypatch, keep, chunk_size):
    # With gradients the Triton forward keeps the first backward chunk's logits (fp16 on GPU) and the
    # backward turns them into that chunk's gradient in place; chunk_size=None keeps the whole shard
    # (no GEMM recomputed at all). Both must match the reference, and so must recomputing every chunk.
    from verl_mega.kernels import logprob, logprob_triton
    monkeypatch.setattr(logprob, "KEEP_FIRST_CHUNK", keep)
    calls = []
    kept_grad = logprob_triton.kept_grad_logits
    monkeypatch.setattr(logprob_triton, "kept_grad_logits", lambda *a, **k: calls.append(1) or kept_grad(*a, **k))
    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    hidden, weight, _, g_lp, g_ent = _inputs(37, 64, 300, dtype, device, 283, seed=6)
    labels = torch.tensor([0, 63, 64, 5, 282, 127, 128] * 5 + [1, 2], device=device)  # edges of the kept chunk
    kw = dict(true_vocab_size=283, temperature=0.8)
    out = _run(fused_logprob_entropy, hidden, weight, labels, g_lp, g_ent, impl="triton", chunk_size=chunk_size, **kw)
    ref = _run(reference_logprob_entropy, hidden.cpu(), weight.cpu(), labels.cpu(), g_lp.cpu(), g_ent.cpu(), **kw)
    err = _max_rel_err(out, ref)
    assert max(err) < (2e-2 if CUDA else 1e-4), err
    assert len(calls) == int(keep)
    # Nothing is kept without autograd, even with weights that require grad (old / reference log-probs).
    spec = logprob._make_spec(hidden, weight.requires_grad_(), labels, None, None, 283, 0.8, True, None, "triton")
    assert spec.keep_first_chunk == keep
    with torch.no_grad():
        spec = logprob._make_spec(hidden, weight, labels, None, None, 283, 0.8, True, None, "triton")
    assert not spec.keep_first_chunk


def test_second_backward_recomputes_the_kept_chunk():
    # The first backward overwrites the kept logits with gradients; backward through the same graph
    # again (retain_graph) must recompute that chunk, not read the gradients as logits.
    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    hidden, weight, labels, g_lp, g_ent = _inputs(20, 32, 150, dtype, device, 150, seed=7)
    hidden.requires_grad_()
    lp, ent = fused_logprob_entropy(hidden, weight, labels, impl="triton", chunk_size=64)
    loss = (lp * g_lp).sum() + (ent * g_ent).sum()
    first, = torch.autograd.grad(loss, hidden, retain_graph=True)
    second, = torch.autograd.grad(loss, hidden)
    # On GPU the kept chunk is fp16 (first) and the recomputed one fp32 (second): bf16 rounding apart.
    err = _max_rel_err([first.float()], [second.float()])[0]
    assert err < (1e-2 if CUDA else 1e-6), err


def test_default_chunk_width_within_memory_budget():
    # The buffer [N, chunk] plus the fp32 grad_h beyond the returned bf16 one stay within EXTRA_BYTES;
    # keeping the first chunk takes the widest width (fewest recomputed columns), recomputing all
    # takes the one whose chunks fill the gradient kernel's waves (8448 = 33 x 256 on 132 SMs).
    from verl_mega.kernels import logprob
    v = 151936
    spec = logprob._Spec(None, 1, 0, v, 1.0, v, None, "triton", True)
    for n, hid in ((16384, 896), (8192, 4096), (65536, 896)):
        for keep in (False, True):
            chunk = logprob._chunk(spec, n, v, 2, hid, 132, keep)
            assert chunk % 256 == 0 and chunk * n * 2 + n * hid * 2 <= logprob.EXTRA_BYTES, (n, hid, keep, chunk)
    assert logprob._chunk(spec, 16384, v, 2, 896, 132, keep=False) == 8448
    cap = (logprob.EXTRA_BYTES - 16384 * 896 * 2) // (16384 * 2) // 256 * 256
    assert logprob._chunk(spec, 16384, v, 2, 896, 132, keep=True) == cap
