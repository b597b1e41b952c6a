"""Qwen2.5-VL in one process (tp = pp = 1): parity with transformers, M-RoPE positions, KV cache, packing, config.

Reference: transformers' `Qwen2_5_VLForConditionalGeneration` in fp32 on a tiny random model with
quirks (odd vocabulary 251, GQA 4/2, window + full-attention vision blocks) and a left-padded batch
whose rows carry 0, 1 and 2 images of grids (1,4,6), (1,6,4), (1,4,4).

Tolerance TOL = 1e-4 (absolute, on logits of magnitude ~5): both sides compute in fp32 (unit
roundoff 6e-8); where the order of a reduction differs (SDPA / varlen kernels, TP all-reduces in the
parallel test) each dot product of length K <= 192 changes by ~sqrt(K) * 6e-8 relative, i.e. ~1e-6
of the activations, and five layers (3 vision, 2 text) of O(1) gain keep that below ~1e-5 at the
logits. 1e-4 is a 10x margin over that, while any real error (a wrong rotary axis, a window
boundary, a misplaced image row) moves logits by O(0.1) — `test_images_move_the_logits` checks the
images matter at that scale. Weight gradients are compared with the same bound relative to their largest
entry (the same reordering argument, applied to the backward sums).
"""

import pytest
import torch

from verl_mega.models import ModelConfig, build_stage, image_token_counts, load_hf_weights
from verl_mega.models.config import VisionConfig
from verl_mega.models.mrope import decode_position_ids, mrope_position_ids
from verl_mega.parallel import Layout
from verl_mega.testing.list_cache import ListCache
from verl_mega.testing.tiny_vlm import TINY_VLM_DEFAULTS, make_tiny_qwen2_5_vl, tiny_vlm_batch

TOL = 1e-4
IMG, VS = TINY_VLM_DEFAULTS["image_token_id"], TINY_VLM_DEFAULTS["vision_start_token_id"]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return make_tiny_qwen2_5_vl(tmp_path_factory.mktemp("vlm") / "qwen2_5_vl", seed=3)


@pytest.fixture(scope="module")
def model(vlm_dir):
    stage = build_stage(ModelConfig.from_hf(vlm_dir), Layout.create(1, 1), init_seed=None)
    load_hf_weights(stage, vlm_dir)
    return stage.eval()


@pytest.fixture(scope="module")
def hf_model(vlm_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(vlm_dir, dtype=torch.float32).eval()


def positions(batch):
    return mrope_position_ids(batch["input_ids"], batch["image_grid_thw"], batch["attention_mask"],
                              image_token_id=IMG, vision_start_token_id=VS, spatial_merge_size=2)


def ours_logits(model, batch, **kw):
    pos, _ = positions(batch)
    with torch.no_grad():
        out = model(batch["input_ids"], pos, batch["attention_mask"], pixel_values=batch["pixel_values"],
                    image_grid_thw=batch["image_grid_thw"], **kw)
    return out[..., : model.true_vocab_size]


def hf_logits(hf_model, batch):
    ids = batch["input_ids"]
    with torch.no_grad():  # mm_token_type_ids lets transformers compute the M-RoPE positions itself
        return hf_model(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                        image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=(ids == IMG).int()).logits


def test_logits_match_transformers(model, hf_model):
    batch = tiny_vlm_batch()
    real = batch["attention_mask"].bool()
    ours, ref = ours_logits(model, batch), hf_logits(hf_model, batch)
    assert ours.shape == ref.shape and ref[real].abs().max() > 1.0
    assert (ours - ref)[real].abs().max() < TOL


def test_gradients_match_transformers(vlm_dir, hf_model):
    """Backward through the image embeddings' scatter and the tower: weight gradients of L = sum(logits * R)."""
    stage = build_stage(ModelConfig.from_hf(vlm_dir), Layout.create(1, 1), init_seed=None)
    load_hf_weights(stage, vlm_dir)
    batch = tiny_vlm_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    r = torch.randn(*ids.shape, 251, generator=torch.Generator().manual_seed(2)) * mask[..., None]
    pos, _ = positions(batch)
    out = stage(ids, pos, mask, pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    (out[..., :251] * r).sum().backward()
    hf_model.zero_grad()
    hf_out = hf_model(input_ids=ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                      image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=(ids == IMG).int()).logits
    (hf_out * r).sum().backward()
    hf_grads = {n: p.grad for n, p in hf_model.named_parameters()}
    ours = dict(stage.named_parameters())
    for name, hf_name in [("visual.patch_embed.proj.weight", "model.visual.patch_embed.proj.weight"),
                          ("visual.blocks.0.attn.qkv.weight", "model.visual.blocks.0.attn.qkv.weight"),
                          ("visual.merger.mlp.2.bias", "model.visual.merger.mlp.2.bias"),
                          ("layers.0.self_attn.q_proj.weight",
                           "model.language_model.layers.0.self_attn.q_proj.weight")]:
        ref = hf_grads[hf_name]
        assert ref.abs().max() > 0 and (ours[name].grad - ref).abs().max() < TOL * ref.abs().max(), name
    hf_model.zero_grad(set_to_none=True)


def test_images_move_the_logits(model):
    batch = tiny_vlm_batch()
    other = dict(batch, pixel_values=torch.randn_like(batch["pixel_values"]))
    real = batch["attention_mask"].bool()
    diff = (ours_logits(model, batch) - ours_logits(model, other)).abs()
    assert diff[0][real[0]].max() == 0  # row 0 has no image
    assert diff[1:][real[1:]].max() > 0.1


def test_vision_tower_matches_transformers(model, hf_model):
    batch = tiny_vlm_batch()
    with torch.no_grad():
        ref = torch.cat(hf_model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
        ours = model.encode_images(batch["pixel_values"], batch["image_grid_thw"])
    assert ours.shape == (6 + 6 + 4, 64) == ref.shape  # grids (1,4,6), (1,6,4), (1,4,4) merged 2 x 2
    assert (ours - ref).abs().max() < TOL


def test_image_embeds_equal_pixel_values_path(model):
    batch = tiny_vlm_batch()
    pos, _ = positions(batch)
    with torch.no_grad():
        embeds = model.encode_images(batch["pixel_values"], batch["image_grid_thw"])
        shared = model(batch["input_ids"], pos, batch["attention_mask"], image_embeds=embeds)
    assert torch.equal(shared[..., : model.true_vocab_size], ours_logits(model, batch))


def test_one_encoding_shared_by_n_samples(model):
    """Rollout encodes a prompt's images once and repeats the embeddings for its n samples."""
    one = tiny_vlm_batch(((2, ((1, 6, 4), (1, 4, 4))),))
    n = 3
    pos, _ = positions(one)
    with torch.no_grad():
        embeds = model.encode_images(one["pixel_values"], one["image_grid_thw"])
        assert image_token_counts(one["image_grid_thw"], 2) == [6, 4] and embeds.shape[0] == 10
        rep = model(one["input_ids"].repeat(n, 1), pos.repeat(1, n, 1), one["attention_mask"].repeat(n, 1),
                    image_embeds=embeds.repeat(n, 1))[..., : model.true_vocab_size]
    single = ours_logits(model, one)
    assert all((rep[i] - single[0]).abs().max() < TOL for i in range(n))


ROWS_FOR_POSITIONS = [  # unpadded, image first, two images back to back (text between), text only
    ((0, ((1, 4, 4),)), (4, ((1, 2, 6), (1, 6, 2))), (7, ())),
    ((1, ((1, 8, 2),)),),
]


@pytest.mark.parametrize("rows", [None] + ROWS_FOR_POSITIONS)
def test_mrope_positions_equal_get_rope_index(hf_model, rows):
    batch = tiny_vlm_batch() if rows is None else tiny_vlm_batch(rows, seed=1)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos, deltas = positions(batch)
    ref, ref_deltas = hf_model.model.get_rope_index(ids, (ids == IMG).int(), image_grid_thw=batch["image_grid_thw"],
                                                    attention_mask=mask)
    assert pos.shape == (3,) + ids.shape and pos.dtype == torch.long
    assert torch.equal(pos, ref) and torch.equal(deltas, ref_deltas.view(-1))


def test_text_only_rows_are_plain_positions():
    from verl_mega.models import position_ids_from_mask

    batch = tiny_vlm_batch(((3, ()), (6, ())))
    pos, deltas = mrope_position_ids(batch["input_ids"], None, batch["attention_mask"], image_token_id=IMG,
                                     spatial_merge_size=2)
    plain = position_ids_from_mask(batch["attention_mask"])
    assert all(torch.equal(pos[a], plain) for a in range(3)) and deltas.tolist() == [0, 0]


def test_mrope_errors():
    batch = tiny_vlm_batch()
    kw = dict(image_token_id=IMG, spatial_merge_size=2)
    with pytest.raises(NotImplementedError, match="videos"):
        mrope_position_ids(batch["input_ids"], batch["image_grid_thw"], video_grid_thw=batch["image_grid_thw"], **kw)
    with pytest.raises(ValueError, match="image_grid_thw has 4 rows but input_ids hold 3"):
        mrope_position_ids(batch["input_ids"], torch.cat([batch["image_grid_thw"]] * 2)[:4], **kw)
    with pytest.raises(ValueError, match="does not match its image_grid_thw"):
        mrope_position_ids(batch["input_ids"], batch["image_grid_thw"].flip(0), **kw)
    no_start = batch["input_ids"].masked_fill(batch["input_ids"] == VS, 5)
    mrope_position_ids(no_start, batch["image_grid_thw"], **kw)  # without vision_start_token_id: not checked
    with pytest.raises(ValueError, match="does not follow the vision-start token 247"):
        mrope_position_ids(no_start, batch["image_grid_thw"], vision_start_token_id=VS, **kw)


def test_kv_cache_decode_step_equals_full_forward(model):
    """Prefill with the images, then one decode token at position (real tokens so far) + delta."""
    batch = tiny_vlm_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    new = torch.tensor([[11], [12], [13]])
    full_batch = dict(batch, input_ids=torch.cat([ids, new], 1), attention_mask=torch.cat([mask, mask[:, -1:]], 1))
    full = ours_logits(model, full_batch)[:, -1]
    pos, deltas = positions(batch)
    cache = ListCache()
    with torch.no_grad():
        model(ids, pos, mask, kv_cache=cache, pixel_values=batch["pixel_values"],
              image_grid_thw=batch["image_grid_thw"])
        step_pos = decode_position_ids(full_batch["attention_mask"], deltas)
        assert torch.equal(step_pos, positions(full_batch)[0][:, :, -1:])
        step = model(new, step_pos, full_batch["attention_mask"], kv_cache=cache)[:, -1, : model.true_vocab_size]
    assert (step - full).abs().max() < TOL


def test_packed_forward_equals_padded(model):
    batch = tiny_vlm_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos, _ = positions(batch)
    real = mask.bool()
    lengths = mask.sum(1)
    packed_ids = ids[real].view(1, -1)  # row-major: rows back to back, pads dropped
    packed_pos = pos[:, real].view(3, 1, -1)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()
    with torch.no_grad():
        packed = model(packed_ids, packed_pos, cu_seqlens=cu, pixel_values=batch["pixel_values"],
                       image_grid_thw=batch["image_grid_thw"])[0, :, : model.true_vocab_size]
    assert (packed - ours_logits(model, batch)[real]).abs().max() < TOL


def test_micro_batch_without_images(model):
    batch = tiny_vlm_batch(((3, ()), (6, ())))
    pos, _ = positions(batch)
    empty = dict(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    assert empty["pixel_values"].shape == (0, 3 * 2 * 14 * 14) and empty["image_grid_thw"].shape == (0, 3)
    with torch.no_grad():
        assert torch.equal(model(batch["input_ids"], pos, batch["attention_mask"], **empty),
                           model(batch["input_ids"], pos, batch["attention_mask"]))


def test_image_token_count_mismatch_is_a_value_error(model):
    batch = tiny_vlm_batch()
    pos, _ = positions(batch)
    with pytest.raises(ValueError, match=r"input_ids hold 16 image tokens \(id 249\) but there are 10"):
        model(batch["input_ids"], pos, batch["attention_mask"], image_embeds=torch.zeros(10, 64))
    with pytest.raises(ValueError, match="pixel_values has shape"):
        model(batch["input_ids"], pos, batch["attention_mask"], pixel_values=batch["pixel_values"][:-1],
              image_grid_thw=batch["image_grid_thw"])


def test_config_round_trip(vlm_dir):
    from transformers import Qwen2_5_VLConfig

    config = ModelConfig.from_hf(vlm_dir)
    assert config.is_vlm and config.model_type == "qwen2_5_vl" and config.attention_bias
    assert config.mrope_section == (2, 3, 3) and config.vision.fullatt_block_indexes == (1,)
    assert (config.vocab_size, config.num_kv_heads, config.head_dim) == (251, 2, 16)
    hf = config.to_hf_dict()
    assert hf["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert ModelConfig.from_hf(hf) == config
    back, orig = Qwen2_5_VLConfig(**hf), Qwen2_5_VLConfig.from_pretrained(vlm_dir)
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "rope_parameters", "rms_norm_eps"):
        assert getattr(back.text_config, key) == getattr(orig.text_config, key), key
    for key in ("depth", "window_size", "fullatt_block_indexes", "out_hidden_size", "patch_size"):
        assert getattr(back.vision_config, key) == getattr(orig.vision_config, key), key
    assert (back.image_token_id, back.vision_start_token_id) == (orig.image_token_id, orig.vision_start_token_id)


def test_config_errors():
    vision = VisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                          window_size=56)
    base = dict(vocab_size=251, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=16, attention_bias=True, model_type="qwen2_5_vl", vision=vision, image_token_id=249)
    with pytest.raises(ValueError, match="mrope_section"):
        ModelConfig(**base)
    with pytest.raises(ValueError, match=r"mrope_section \(2, 3, 4\) must be 3 numbers summing to head_dim/2 = 8"):
        ModelConfig(**base, mrope_section=(2, 3, 4))
    with pytest.raises(ValueError, match="fullatt_block_indexes"):
        VisionConfig(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                     fullatt_block_indexes=(2,))
    text = ModelConfig(**{**base, "model_type": "qwen2", "vision": None, "image_token_id": None})
    stage = build_stage(text, Layout.create(1, 1))
    with pytest.raises(ValueError, match="need an M-RoPE model"):
        stage(torch.ones(1, 3, dtype=torch.long), torch.zeros(3, 1, 3, dtype=torch.long))


QWEN2_5_VL_3B = {  # config.json of the published Qwen2.5-VL-3B-Instruct (flat, pre-4.50 form)
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 11008, "max_position_embeddings": 128000,
    "max_window_layers": 70, "model_type": "qwen2_5_vl", "num_attention_heads": 16, "num_hidden_layers": 36,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936,
}


def test_published_flat_config_reads_and_writes_back():
    from transformers import Qwen2_5_VLConfig

    config = ModelConfig.from_hf(QWEN2_5_VL_3B)
    assert (config.hidden_size, config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (
        2048, 36, 16, 2, 128)
    assert config.mrope_section == (16, 24, 24) and config.rope_scaling is None and config.rope_theta == 1e6
    assert config.tie_word_embeddings and config.image_token_id == 151655 and config.vision_start_token_id == 151652
    assert config.vision.in_channels == 3 and config.vision.fullatt_block_indexes == (7, 15, 23, 31)
    hf = config.to_hf_dict()
    assert "hidden_size" not in hf and "rope_scaling" not in hf and hf["text_config"]["hidden_size"] == 2048
    assert (hf["video_token_id"], hf["vision_end_token_id"]) == (151656, 151653)
    ours, orig = Qwen2_5_VLConfig(**hf), Qwen2_5_VLConfig(**QWEN2_5_VL_3B)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads",
                "rope_parameters", "rms_norm_eps", "max_position_embeddings"):
        assert getattr(ours.text_config, key) == getattr(orig.text_config, key), key
    assert ours.vision_config.to_dict() == orig.vision_config.to_dict()
    assert ModelConfig.from_hf(config.to_hf_dict()).to_dict() == config.to_dict()


def test_loads_the_transformers_4_5x_tensor_names(vlm_dir, model, tmp_path):
    """Checkpoints saved by transformers 4.52 - 4.57 name tensors model.language_model.* / model.visual.*."""
    import shutil

    from safetensors.torch import load_file, save_file

    renamed = {("model." + k if k.startswith("visual.") else k.replace("model.", "model.language_model.", 1)): v
               for k, v in load_file(f"{vlm_dir}/model.safetensors").items()}
    assert "model.language_model.layers.0.self_attn.q_proj.bias" in renamed
    assert "model.visual.merger.mlp.0.bias" in renamed
    shutil.copy(f"{vlm_dir}/config.json", tmp_path / "config.json")
    save_file(renamed, str(tmp_path / "model.safetensors"))
    stage = build_stage(ModelConfig.from_hf(tmp_path), Layout.create(1, 1), init_seed=None)
    load_hf_weights(stage, tmp_path)
    ref = dict(model.named_parameters())
    assert all(torch.equal(p, ref[n]) for n, p in stage.named_parameters())
