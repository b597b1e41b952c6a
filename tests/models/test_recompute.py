"""Activation recompute (parallelize.apply_recompute) changes memory, not numbers: the loss and every
gradient of selective and full (all layers, and the first K) recompute equal no recompute, padded and
packed. Tolerance 1e-6 (fp32): recompute reruns the same ops on the same inputs, so the values are
equal up to kernel nondeterminism, which is none on CPU (the test measures 0)."""

import pytest
import torch

from verl_mega.models.config import ModelConfig
from verl_mega.models.decoder import DecoderModel
from verl_mega.models.parallelize import apply_recompute
from verl_mega.parallel import Layout
from verl_mega.trainer.packing import pack_microbatch

TOL = 1e-6


def _model() -> DecoderModel:
    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                         num_kv_heads=2, head_dim=8, max_position_embeddings=64)
    return DecoderModel(config, Layout.create(1, 1, 1).tp_group, layer_range=(0, 3), has_embedding=True,
                        has_head=True, init_seed=0)


def _loss_and_grads(model, packed: bool):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (3, 10), generator=gen)
    mask = (torch.arange(10)[None] >= torch.tensor([0, 3, 6])[:, None]).long()
    mb = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    if packed:
        mb = pack_microbatch(mb)
        logits = model(mb["input_ids"], mb["position_ids"], cu_seqlens=mb["cu_seqlens"])
    else:
        logits = model(mb["input_ids"], mb["position_ids"], mb["attention_mask"])[mask.bool()]
    model.zero_grad()
    loss = logits.float().pow(2).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("mode,layers", [("selective", None), ("full", None), ("full", 2)])
def test_recompute_matches_none(mode, layers, packed):
    model = _model()
    ref_loss, ref = _loss_and_grads(model, packed)
    apply_recompute(model, mode, layers)
    assert any(layer.recompute_full or layer.mlp.recompute_act for layer in model.layers)
    loss, grads = _loss_and_grads(model, packed)
    assert abs(loss - ref_loss) <= TOL * abs(ref_loss)
    for name, g in grads.items():
        assert torch.allclose(g, ref[name], atol=TOL, rtol=0), name


def test_recompute_rejects_unknown_mode():
    with pytest.raises(ValueError, match="recompute mode"):
        apply_recompute(_model(), "some")
