"""The decoder's generation fast path: fused_ops kernels (Triton interpreter on CPU) against their
torch references; the decoder's fused KV-cache forward against its torch path (tp 1 in process,
tp 2 on 2 gloo ranks, there also the capture-safe embedding against megatron's); GQA query folding
against the K/V-expand reference, forward and backward.

On a CUDA machine the kernel and decoder tests run the compiled kernels on the GPU (without TRITON_INTERPRET a
Triton kernel cannot read CPU tensors); elsewhere the interpreter on CPU. The tp 2 test always runs on gloo ranks
in the interpreter.

Tolerances: fp32 1e-5 (the norm's mean is summed in another order); bf16 a few bf16 ulps (the
interpreter rounds to bf16 by truncation, the GPU to nearest).
"""

import pytest
import torch
import torch.nn.functional as F

from verl_mega.models import DecoderModel, ModelConfig, fused_ops, position_ids_from_mask
from verl_mega.models.layers import attend, stacked_rows
from verl_mega.parallel import Layout
from verl_mega.parallel.zero import ZeroOptimizer
from verl_mega.testing.multiprocess import run_distributed
from verl_mega.testing.list_cache import ListCache

BF16_TOL = dict(rtol=2 ** -6, atol=2 ** -4)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the kernel and decoder tests put their tensors


@pytest.fixture
def interpret(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _close(out, ref, dtype):
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else BF16_TOL
    torch.testing.assert_close(out.float(), ref.float(), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_references(interpret, dtype):
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=gen).to(DEVICE, dtype)  # noqa: E731
    x, res, w = rnd(3, 5, 40), rnd(3, 5, 40), 1 + 0.1 * rnd(40)  # width 40: a masked block of 64
    assert fused_ops.available(x)
    _close(fused_ops.rms_norm(x, w, 1e-6), fused_ops.rms_norm_reference(x, w, 1e-6), dtype)
    normed, summed = fused_ops.rms_norm(x, w, 1e-6, residual=res)
    ref_normed, ref_summed = fused_ops.rms_norm_reference(x, w, 1e-6, residual=res)
    _close(normed, ref_normed, dtype)
    _close(summed, ref_summed, dtype)
    b, s, hq, hk = 2, 3, 6, 2  # 6 query heads: a masked block of 8
    for d in (16, 12):  # 12: head_dim not a power of two
        q, k, v = rnd(b, s, hq * d), rnd(b, s, hk * d), rnd(b, s, hk * d)
        angles = torch.randn(b, s, d // 2, generator=gen).to(DEVICE) * 3
        cos, sin = torch.cat([angles, angles], -1).cos().to(dtype), torch.cat([angles, angles], -1).sin().to(dtype)
        for biases in ((rnd(hq * d), rnd(hk * d), rnd(hk * d)), (None, None, None)):
            out = fused_ops.rope_qkv_(q.clone(), k.clone(), v.clone(), cos, sin, *biases)
            ref = fused_ops.rope_qkv_reference(q, k, v, cos, sin, *biases)
            for o, r in zip(out, ref):
                assert o.shape == r.shape
                _close(o, r, dtype)
        # column slices of one stacked projection [B, S, (Hq + 2 Hk) * D]: rows with a stride
        for biases in ((rnd(hq * d), rnd(hk * d), rnd(hk * d)), (None, None, None)):
            qkv = rnd(b, s, (hq + 2 * hk) * d)
            q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
            ref = fused_ops.rope_qkv_reference(q, k, v, cos, sin, *biases)
            out = fused_ops.rope_qkv_(q, k, v, cos, sin, *biases)
            for o, r in zip(out, ref):
                _close(o, r, dtype)
    gate, up = rnd(3, 5, 70), rnd(3, 5, 70)
    _close(fused_ops.silu_mul(gate.clone(), up), fused_ops.silu_mul_reference(gate, up), dtype)
    gate_up = rnd(3, 5, 140)  # the two halves of one stacked gate/up projection
    ref = fused_ops.silu_mul_reference(*gate_up.chunk(2, dim=-1))
    _close(fused_ops.silu_mul(*gate_up.chunk(2, dim=-1)), ref, dtype)


def test_gqa_query_folding_matches_expanded_kv():
    """attend() with a mask (folded query heads for short queries, expanded K/V for long ones) equals K/V repeated per query head."""
    gen = torch.Generator().manual_seed(1)
    b, hq, hkv, d, s_kv = 2, 6, 2, 8, 7
    for s in (1, 4, 20):  # 20 > FOLD_MAX_QUERIES: the expanded-K/V path
        q = torch.randn(b, hq, s, d, generator=gen, requires_grad=True)
        k, v = (torch.randn(b, hkv, s_kv, d, generator=gen, requires_grad=True) for _ in range(2))
        mask = torch.rand(b, 1, s, s_kv, generator=gen) > 0.3
        mask[..., -1] = True
        grad = torch.randn(b, s, hq * d, generator=gen)
        out = attend(q, k, v, mask)
        (out * grad).sum().backward()
        got = [out.detach()] + [t.grad.clone() for t in (q, k, v)]
        for t in (q, k, v):
            t.grad = None
        ke, ve = (t.repeat_interleave(hq // hkv, dim=1) for t in (k, v))  # head h reads kv head h // rep
        ref = F.scaled_dot_product_attention(q, ke, ve, attn_mask=mask).transpose(1, 2).reshape(b, s, hq * d)
        (ref * grad).sum().backward()
        for g, r in zip(got, [ref.detach()] + [t.grad for t in (q, k, v)]):
            torch.testing.assert_close(g, r, rtol=0, atol=1e-5)




CONFIGS = {  # qwen3: q/k norm (+ bias to cover that branch); qwen2: bias; llama: neither, head_dim 16
    "qwen3": dict(attention_bias=True, qk_norm=True, model_type="qwen3", head_dim=8),
    "qwen2": dict(attention_bias=True, qk_norm=False, model_type="qwen2", head_dim=8),
    "llama": dict(attention_bias=False, qk_norm=False, model_type="llama", head_dim=16),
}


def tiny_config(name: str) -> ModelConfig:
    return ModelConfig(vocab_size=131, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                       num_kv_heads=2, **CONFIGS[name])


@torch.no_grad()
def prefill_and_decode(model, steps: int = 2) -> torch.Tensor:
    """Logits of a left-padded prefill and `steps` single-token decode steps with a ListCache: [B, P+steps, V]."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 131, (2, 5 + steps), generator=gen).to(model.output_weight().device)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    cache, out = ListCache(), []
    out.append(model(ids[:, :5], position_ids_from_mask(mask[:, :5]), mask[:, :5], kv_cache=cache))
    for t in range(5, 5 + steps):
        pos = position_ids_from_mask(mask[:, : t + 1])[:, -1:]
        out.append(model(ids[:, t:t + 1], pos, mask[:, : t + 1], kv_cache=cache))
    return torch.cat(out, dim=1)


def fused_vs_torch(model) -> tuple[torch.Tensor, torch.Tensor]:
    model.fused_inference = True
    fused = prefill_and_decode(model)
    model.fused_inference = False
    plain = prefill_and_decode(model)
    model.fused_inference = True
    return fused, plain


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_decoder_forward_matches_torch_path(interpret, name, monkeypatch):
    layout = Layout.create(1, 1)
    model = DecoderModel(tiny_config(name), layout.tp_group, layer_range=(0, 2), has_embedding=True,
                         has_head=True, init_seed=1).eval().to(DEVICE)
    calls = []
    rope = fused_ops.rope_qkv_
    monkeypatch.setattr(fused_ops, "rope_qkv_", lambda *a, **kw: calls.append(1) or rope(*a, **kw))
    fused, plain = fused_vs_torch(model)
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-5)
    assert len(calls) == 2 * 3  # 2 layers x (prefill + 2 decode steps), only while fused_inference
    # the fused path is taken only for cache forwards without autograd
    ids = torch.randint(1, 131, (1, 4), device=DEVICE)
    pos = position_ids_from_mask(torch.ones_like(ids))
    with torch.no_grad():
        model(ids, pos)
    model(ids, pos, torch.ones_like(ids), kv_cache=ListCache())
    assert len(calls) == 6


def test_fused_forward_of_two_pipeline_stages_matches_torch_path(interpret):
    """A stage without the head returns its layers' deferred residual sum (x + delta) on the fused path: two
    stages chained give the one-stage fused logits, and both paths agree."""
    layout = Layout.create(1, 1)
    build = dict(init_seed=1, device=DEVICE)
    whole = DecoderModel(tiny_config("qwen2"), layout.tp_group, layer_range=(0, 2), has_embedding=True,
                         has_head=True, **build).eval()
    first = DecoderModel(tiny_config("qwen2"), layout.tp_group, layer_range=(0, 1), has_embedding=True,
                         has_head=False, **build).eval()
    last = DecoderModel(tiny_config("qwen2"), layout.tp_group, layer_range=(1, 2), has_embedding=False,
                        has_head=True, **build).eval()
    ids = torch.randint(1, 131, (2, 6), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    mask = torch.ones_like(ids)
    pos = position_ids_from_mask(mask)
    for fused in (True, False):
        for m in (whole, first, last):
            m.fused_inference = fused
        with torch.no_grad():
            ref = whole(ids, pos, mask, kv_cache=ListCache())
            split = last(first(ids, pos, mask, kv_cache=ListCache()), pos, mask, kv_cache=ListCache())
        torch.testing.assert_close(split, ref, rtol=0, atol=1e-5)
        if fused:
            fused_logits = ref
    torch.testing.assert_close(fused_logits, ref, rtol=0, atol=1e-5)


def test_stacked_projections_run_as_one_gemm_and_match_separate_ones(interpret):
    """A built layer's q/k/v and gate/up weights are consecutive rows of one buffer each, so the fused decode path
    runs one GEMM for each; ZeRO's flat buffer keeps them stacked; once a parameter's data is moved on its own,
    the path falls back to separate GEMMs, with the same logits."""
    model = DecoderModel(tiny_config("qwen2"), Layout.create(1, 1).tp_group, layer_range=(0, 2), has_embedding=True,
                         has_head=True, init_seed=1, device=DEVICE).eval()
    groups = [group for layer in model.layers for group in layer.projection_groups()]  # [q, k, v], [gate, up]
    for params in groups:
        whole = stacked_rows(params)
        assert whole is not None and whole.shape[0] == sum(p.shape[0] for p in params)
        torch.testing.assert_close(whole, torch.cat(params), rtol=0, atol=0)
    gemm_widths = []
    linear = F.linear
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "linear", lambda x, w, *a: gemm_widths.append(w.shape[0]) or linear(x, w, *a))
        stacked = prefill_and_decode(model)
    config = model.config
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    assert gemm_widths.count(q_rows + 2 * kv_rows) == 2 * 3 and gemm_widths.count(2 * config.intermediate_size) == 6
    layout = Layout.create(1, 1)
    zero = ZeroOptimizer(list(model.parameters()), layout.dp_group, torch.optim.AdamW)  # re-points every parameter
    for params in groups:  # into its flat buffer, the stacked ones still in order (Qwen2: biases between q, k, v)
        assert stacked_rows(params) is not None
        assert params[0].untyped_storage().data_ptr() == zero.buffer.untyped_storage().data_ptr()
    torch.testing.assert_close(prefill_and_decode(model), stacked, rtol=0, atol=0)
    with torch.no_grad():
        for params in groups:
            for p in params:
                p.data = p.data.clone()  # each on its own storage
    assert all(stacked_rows(params) is None for params in groups)
    separate = prefill_and_decode(model)
    torch.testing.assert_close(stacked, separate, rtol=0, atol=1e-5)
    assert stacked_rows([torch.zeros(2, 3), torch.zeros(2, 3)]) is None  # two storages
    buffer = torch.zeros(4, 3)
    assert stacked_rows([buffer[2:], buffer[:2]]) is None  # one storage, out of order


def _tp2_rank():
    """tp 2: fused vs torch decoder forward (per vocab shard); capture-safe embedding vs megatron's."""
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel.layers import VocabParallelEmbedding

    from verl_mega.models.layers import CaptureSafeVocabParallelEmbedding

    layout = Layout.create(2, 1)
    res = {}
    for name in ("qwen2",):
        model = DecoderModel(tiny_config(name), layout.tp_group, layer_range=(0, 2), has_embedding=True,
                             has_head=True, init_seed=1).eval()
        res[name] = fused_vs_torch(model)
    mp = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=True, perform_initialization=False)
    ours = CaptureSafeVocabParallelEmbedding(16, 4, init_method=torch.nn.init.zeros_, config=mp, tp_group=layout.tp_group)
    ref = VocabParallelEmbedding(16, 4, init_method=torch.nn.init.zeros_, config=mp, tp_group=layout.tp_group)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(8, 4, generator=torch.Generator().manual_seed(layout.tp_group.rank())))
        ref.weight.copy_(ours.weight)
    ids = torch.tensor([[0, 7, 8, 15], [3, 9, 12, 1]])
    grad = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(5))
    outs = []
    for emb in (ours, ref):
        out = emb(ids)
        (out * grad).sum().backward()
        outs.append((out.detach(), emb.weight.grad.clone()))
    res["embedding"] = outs
    return res


def test_tp2_fused_forward_and_capture_safe_embedding():
    results = run_distributed(_tp2_rank, 2, env={"TRITON_INTERPRET": "1"}, timeout_s=240)
    for res in results:
        torch.testing.assert_close(res["qwen2"][0], res["qwen2"][1], rtol=0, atol=1e-5)
        (out, grad), (ref_out, ref_grad) = res["embedding"]
        assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)
        assert out.abs().sum() > 0 and grad.abs().sum() > 0
