"""Single-process checks of the decoder: KV-cache protocol, masks, stage split, config parsing, padding."""

import pytest
import torch

from verl_mega.models import DecoderModel, ModelConfig, build_attention_mask, position_ids_from_mask, stage_layer_range
from verl_mega.parallel import Layout
from verl_mega.testing.list_cache import ListCache


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=131, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8, attention_bias=True, qk_norm=True, model_type="qwen3",
                rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 16})
    return ModelConfig(**{**base, **kw})




@pytest.fixture(scope="module")
def model():
    layout = Layout.create(1, 1)
    return DecoderModel(tiny_config(), layout.tp_group, layer_range=(0, 2), has_embedding=True, has_head=True,
                        init_seed=1).eval()


def left_padded():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 131, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, 0), mask


@torch.no_grad()
def test_kv_cache_decode_matches_full_forward(model):
    ids, mask = left_padded()
    full = model(ids, position_ids_from_mask(mask), mask)
    assert torch.isfinite(full).all()  # pad query rows attend to nothing: still no NaN
    cache, prefill = ListCache(), 6
    steps = [model(ids[:, :prefill], position_ids_from_mask(mask[:, :prefill]), mask[:, :prefill], kv_cache=cache)]
    for t in range(prefill, ids.shape[1]):
        pos = position_ids_from_mask(mask[:, : t + 1])[:, -1:]
        steps.append(model(ids[:, t:t + 1], pos, mask[:, : t + 1], kv_cache=cache))
    incremental = torch.cat(steps, dim=1)
    assert cache.kv[1][0].shape == (3, 2, 10, 8)  # [B, kv_heads, S_kv, head_dim], keyed by global layer index
    real = mask.bool()
    assert (incremental - full)[real].abs().max() < 1e-5


@torch.no_grad()
def test_explicit_attn_mask_equals_padding_mask(model):
    ids, mask = left_padded()
    pos = position_ids_from_mask(mask)
    explicit = build_attention_mask(mask, None, ids.shape[1], False)
    assert explicit.shape == (3, 1, 10, 10) and explicit.dtype == torch.bool
    assert torch.equal(model(ids, pos, attn_mask=explicit), model(ids, pos, mask))
    ones = torch.ones_like(mask)  # no padding: the is_causal fast path gives the same as the explicit mask
    assert (model(ids, position_ids_from_mask(ones)) - model(ids, position_ids_from_mask(ones), ones)).abs().max() < 1e-5


@torch.no_grad()
def test_stage_outputs_and_output_weight(model):
    ids, mask = left_padded()
    pos = position_ids_from_mask(mask)
    logits = model(ids, pos, mask)
    assert logits.shape == (3, 10, 256)  # 131 padded to 256
    assert logits[..., 131:].abs().max() == 0  # padded rows are zero
    hidden = model(ids, pos, mask, return_hidden=True)
    assert torch.allclose(hidden @ model.output_weight().T, logits, atol=1e-5)
    assert model.vocab_start_index == 0 and model.true_vocab_size == 131


@pytest.mark.parametrize("width", [10, 16, 1150])
def test_attention_bias_is_an_aligned_view_with_the_masks_values(width):
    """SDPA's memory-efficient CUDA kernel copies a bias whose strides (but the last) are not multiples of 8 on every
    call; the decoder's bias is a view of rows rounded up to 16 elements, with the same values as a plain one."""
    from verl_mega.models.masks import BIAS_ROW_ALIGNMENT, attention_bias
    mask = build_attention_mask(torch.randint(0, 2, (3, width)), None, width, False)  # [3, 1, width, width]
    bias = attention_bias(mask, torch.bfloat16)
    assert bias.shape == mask.shape and bias.dtype == torch.bfloat16 and bias.stride(-1) == 1
    assert all(stride % BIAS_ROW_ALIGNMENT == 0 for stride in bias.stride()[:-1]), bias.stride()
    plain = torch.full(mask.shape, float("-inf"), dtype=torch.bfloat16).masked_fill_(mask, 0.0)
    assert torch.equal(bias, plain)


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_stage_layer_range():
    assert [stage_layer_range(7, 3, r) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert [stage_layer_range(4, 2, r) for r in range(2)] == [(0, 2), (2, 4)]
    with pytest.raises(ValueError, match="num_layers=2 is smaller than pipeline_parallel_size=3"):
        stage_layer_range(2, 3, 0)


def test_config_from_transformers4_dict_and_back():
    hf = dict(model_type="llama", vocab_size=251, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
              rope_scaling={"type": "linear", "factor": 2.0}, bos_token_id=1, eos_token_id=2)
    cfg = ModelConfig.from_hf(hf)
    assert cfg.head_dim == 8 and cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    out = cfg.to_hf_dict()
    assert out["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    assert out["eos_token_id"] == 2 and out["architectures"] == ["LlamaForCausalLM"]
    assert ModelConfig.from_hf(out).to_dict() == cfg.to_dict()


def test_padded_vocab_size_is_tp_independent():
    cfg = tiny_config(vocab_size=251)
    assert [cfg.padded_vocab_size(tp) for tp in (1, 2, 4, 8)] == [256] * 4
    assert cfg.padded_vocab_size(3) == 384


def test_config_errors():
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        ModelConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by tensor_parallel_size=3"):
        tiny_config().check_tp(3)
    with pytest.raises(ValueError, match="num_kv_heads=2 is not divisible by tensor_parallel_size=4"):
        tiny_config().check_tp(4)
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        tiny_config(rope_scaling={"rope_type": "yarn", "factor": 2.0})
