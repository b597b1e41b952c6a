"""`model.compile`: torch.compile'd decoder layers on the training-side passes (parallelize.apply_compile).

A compiled layer gives the eager layer's outputs and gradients (packed and padded attention, fp32: inductor
reassociates sums, observed <= 3e-7 of each tensor's largest entry; tolerance 1e-5 of it); the compiled function
is used only for forwards without a KV cache (generation stays eager); with full or selective recompute it gives the
eager numbers too; it is refused with sequence parallelism; a
GRPO trainer with `model.compile` reproduces the eager trainer's metrics over two steps (same tolerance, relative
to each metric's size).
"""

import pytest
import torch

from verl_mega.models import DecoderModel, ModelConfig
from verl_mega.models.parallelize import apply_compile, apply_recompute
from verl_mega.models.varlen_attention import PackedSeqs
from verl_mega.parallel import Layout
from verl_mega.testing.list_cache import ListCache

TOL = 1e-5  # of the reference tensor's largest magnitude


def _assert_close(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err, scale = float((got - ref).abs().max()), float(ref.abs().max())
    assert err <= TOL * max(scale, 1.0), f"{what}: max error {err} against max |ref| {scale}"
CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=16, max_position_embeddings=512, tie_word_embeddings=True, attention_bias=True,
              model_type="qwen2")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model() -> DecoderModel:
    layout = Layout.create(1, 1)
    return DecoderModel(ModelConfig(**CONFIG), layout.tp_group, layer_range=(0, 2), has_embedding=True,
                        has_head=True, init_seed=0)


def _fwd_bwd(model, ids, pos, **kw):
    """Final hidden states and every gradient of a weighted sum of them."""
    model.zero_grad(set_to_none=True)
    out = model(ids, pos, return_hidden=True, **kw)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_compiled_layers_match_eager_forward_and_backward():
    model = _model()
    gen = torch.Generator().manual_seed(0)
    packed_ids = torch.randint(1, 256, (1, 29), generator=gen)
    cu = torch.tensor([0, 11, 29], dtype=torch.int32)
    packed_pos = torch.cat([torch.arange(11), torch.arange(18)])[None]
    padded_ids = torch.randint(1, 256, (3, 9), generator=gen)
    mask = torch.ones_like(padded_ids)
    mask[1, :3] = 0
    padded_pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cases = [(packed_ids, packed_pos, {"cu_seqlens": cu}), (padded_ids, padded_pos, {"attention_mask": mask})]
    eager = [_fwd_bwd(model, *case[:2], **case[2]) for case in cases]
    apply_compile(model, True)
    assert all(layer.compiled is not None for layer in model.layers)
    for (ids, pos, kw), (ref_out, ref_grads) in zip(cases, eager):
        out, grads = _fwd_bwd(model, ids, pos, **kw)
        _assert_close(out, ref_out, "hidden states")
        for name, g in grads.items():
            _assert_close(g, ref_grads[name], name)
    apply_compile(model, False)
    assert all(layer.compiled is None for layer in model.layers)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_compiled_layers_with_recompute_match_eager(mode):
    """model.compile together with activation recompute (the memory-saving configuration of the long-sequence
    runs): packed forward and backward equal the eager, non-recomputed layers."""
    model = _model()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 256, (1, 23), generator=gen)
    kw = {"cu_seqlens": torch.tensor([0, 7, 23], dtype=torch.int32)}
    pos = torch.cat([torch.arange(7), torch.arange(16)])[None]
    ref_out, ref_grads = _fwd_bwd(model, ids, pos, **kw)
    apply_recompute(model, mode)
    apply_compile(model, True)
    out, grads = _fwd_bwd(model, ids, pos, **kw)
    _assert_close(out, ref_out, "hidden states")
    for name, g in grads.items():
        _assert_close(g, ref_grads[name], name)


def test_refused_with_sequence_parallel():
    model = _model()
    model.sequence_parallel = True  # what apply_sequence_parallel sets at tp > 1
    with pytest.raises(ValueError, match="sequence_parallel"):
        apply_compile(model, True)
    apply_compile(model, False)  # turning it off is always fine


def test_compiled_function_only_without_kv_cache():
    model = _model().eval()
    calls = []
    for layer in model.layers:
        layer.compiled = (lambda *a, _layer=layer: calls.append(1) or _layer._pre_attention(*a),
                          layer._post_attention)
    ids = torch.randint(1, 256, (2, 5))
    pos = torch.arange(5)[None].expand(2, 5)
    with torch.no_grad():
        model(ids, pos, torch.ones_like(ids), kv_cache=ListCache())  # generation-style forward: eager
        assert calls == []
        model(ids, pos, torch.ones_like(ids))  # log-prob-style forward: the compiled function
    assert len(calls) == 2


def test_packed_sequence_count_does_not_recompile():
    """Packed micro-batches differ in their number of sequences and tokens: for each model shape and grad mode
    (the A/B benchmark compiles two shapes in one process; log-probs run without autograd) only the first micro-batch
    compiles. The compiled graphs get tensors only; a packing object inside a compiled frame made dynamo (torch
    2.11) guard on its sequence count and recompile until its limit of 8 entries per code object (shared by every
    layer of every model), and static-then-dynamic graph pairs for two shapes and two grad modes ran out of it too."""
    from torch._dynamo.utils import counters

    gen = torch.Generator().manual_seed(2)
    for hidden in (64, 96):
        model = DecoderModel(ModelConfig(**{**CONFIG, "hidden_size": hidden}), Layout.create(1, 1).tp_group,
                             layer_range=(0, 2), has_embedding=True, has_head=True, init_seed=0)
        apply_compile(model, True)
        for grad in (False, True):
            graphs = []
            for n in range(2, 7):
                lengths = torch.randint(3, 20, (n,), generator=gen)
                cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()
                ids = torch.randint(1, 256, (1, int(cu[-1])), generator=gen)
                pos = torch.cat([torch.arange(int(n_)) for n_ in lengths])[None]
                if grad:
                    _fwd_bwd(model, ids, pos, cu_seqlens=cu)
                else:
                    with torch.no_grad():
                        model(ids, pos, cu_seqlens=cu, return_hidden=True)
                graphs.append(counters["stats"]["unique_graphs"])
            assert graphs[-1] == graphs[0], f"hidden {hidden}, grad {grad}: graphs after each micro-batch {graphs}"
    assert counters["stats"]["unique_graphs"] > 0  # the layers were compiled


def _grpo_metrics(compile_: bool) -> list[tuple[float, ...]]:
    from verl_mega.rollout.actor import HFActor
    from verl_mega.models import build_stage
    from verl_mega.trainer import PPOTrainer, TrainerConfig

    layout = Layout.create(1, 1)
    config = ModelConfig(**CONFIG, hf_extra={"eos_token_id": 2})
    actor = HFActor(build_stage(config, layout, init_seed=0), layout, config, tokenizer=None, path=None)
    cfg = TrainerConfig()
    cfg.data.max_prompt_length, cfg.rollout.engine.max_batch, cfg.trainer.progress_bar = 8, 8, False
    cfg.model.compile = compile_
    trainer = PPOTrainer(actor, reward_fn=lambda response: float(len(response) % 3 == 0), algorithm="grpo",
                         rollout_batch_size=2, n_samples=4, max_new_tokens=8, temperature=1.0, lr=1e-3,
                         micro_batch_size=4, config=cfg)
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        m = trainer.step([{"prompt_ids": torch.randint(3, 256, (8,), generator=gen).tolist()} for _ in range(2)])
        out.append(tuple(m[k] for k in ("actor/loss", "actor/grad_norm", "actor/entropy", "actor/old_logprob_mean")))
    return out


def test_grpo_trainer_with_compiled_layers_matches_eager():
    from torch._dynamo.utils import counters

    eager = _grpo_metrics(False)
    before = counters["stats"]["unique_graphs"]
    compiled = _grpo_metrics(True)
    assert counters["stats"]["unique_graphs"] > before  # the layers were compiled
    for step_e, step_c in zip(eager, compiled):
        for e, c in zip(step_e, step_c):
            assert abs(e - c) <= TOL * max(1.0, abs(e)), (eager, compiled)
