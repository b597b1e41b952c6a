"""Parity with transformers across (tp, pp) layouts, HF save round trip, value head — one 4-rank gloo spawn.

Every layout is built in the same spawn over 4 ranks: (tp2, pp2), (tp2, pp1, dp2), (tp1, pp2, dp2),
(tp1, pp1, dp4). Reference: transformers' fp32 logits on a left-padded batch; tolerance 1e-4 abs at
non-pad positions (the sharded matmuls and all-reduces only reorder fp32 sums).
"""

import os

import pytest
import torch
import torch.distributed as dist

from verl_mega.testing import run_distributed
from verl_mega.testing.tiny_hf import make_tiny_hf_model

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
MODELS = {  # name -> make_tiny_hf_model kwargs
    "llama_gqa_llama3": dict(arch="llama", vocab_size=251, num_kv_heads=2, rope_scaling=LLAMA3, num_layers=3),
    "qwen2_bias": dict(arch="qwen2", vocab_size=251, num_kv_heads=2, num_layers=2),
    "qwen3_tied_qknorm": dict(arch="qwen3", vocab_size=131, tie=True, num_kv_heads=4, num_layers=2, head_dim=16),
}
LAYOUTS = {"tp2pp2": (2, 2), "tp2pp1": (2, 1), "tp1pp2": (1, 2), "tp1pp1": (1, 1)}
TOL = 1e-4


def batch(vocab: int = 131):
    """Left-padded batch [3, 9]: prompt lengths 9, 6, 3 (pad id 0)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _rank_main(dirs: dict, out_root: str) -> dict:
    from verl_mega.models import ModelConfig, build_stage
    from verl_mega.rollout.actor import HFActor, get_actor_model
    from verl_mega.parallel import Layout

    layouts = {name: Layout.create(tp, pp) for name, (tp, pp) in LAYOUTS.items()}
    ids, mask = batch()
    res = {}
    for model_name, path in dirs.items():
        for lname, layout in layouts.items():
            actor = get_actor_model(path, layout=layout)
            res[("logits", model_name, lname)] = actor.logits(ids, mask)
            if lname == "tp2pp2":
                actor.save_hf(os.path.join(out_root, model_name))
                res[("attrs", model_name, dist.get_rank())] = {
                    n: (getattr(p, "tensor_model_parallel", None), getattr(p, "partition_dim", None),
                        getattr(p, "shared_embedding", False)) for n, p in actor.model.named_parameters()}
                res[("layer_idx", model_name)] = [layer.layer_idx for layer in actor.model.layers]
    # value head: tp/pp invariance, determinism, HF TokenClassification round trip
    for lname in ("tp1pp1", "tp2pp2"):
        critic = get_actor_model(dirs["qwen2_bias"], layout=layouts[lname], value_head=True)
        res[("values", lname)] = critic.values(ids, mask)
        res[("values_again", lname)] = critic.values(ids, mask)
        if lname == "tp2pp2":
            critic.save_hf(os.path.join(out_root, "value"))
    # random init is layout-invariant (init_weights draws full tensors, keeps the slice)
    config = ModelConfig.from_hf(dirs["llama_gqa_llama3"])
    for lname in ("tp1pp1", "tp2pp2"):
        stage = build_stage(config, layouts[lname], init_seed=7)
        res[("random_init", lname)] = HFActor(stage, layouts[lname], config, None, "").logits(ids, mask)
    return res


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dirs = {name: make_tiny_hf_model(str(root / name), with_tokenizer=False, seed=i, **kw)
            for i, (name, kw) in enumerate(MODELS.items())}
    out_root = str(root / "saved")
    results = run_distributed(_rank_main, 4, dirs, out_root, timeout_s=240)
    return dirs, out_root, results


def _hf_logits(path):
    from transformers import AutoModelForCausalLM

    ids, mask = batch()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("model_name", list(MODELS))
def test_logits_match_transformers_every_layout_every_rank(setup, model_name):
    dirs, _, results = setup
    ref = _hf_logits(dirs[model_name])
    _, mask = batch()
    real = mask.bool()
    assert ref[real].abs().max() > 1.0  # weights are not trivially small
    for lname in LAYOUTS:
        for rank, res in enumerate(results):
            out = res[("logits", model_name, lname)]
            assert out.shape == ref.shape, (lname, rank)
            err = (out - ref)[real].abs().max().item()
            assert err < TOL, f"{model_name} {lname} rank {rank}: max abs error {err}"


@pytest.mark.parametrize("model_name", list(MODELS))
def test_save_hf_round_trip_from_tp2_pp2(setup, model_name):
    from transformers import AutoModelForCausalLM

    dirs, out_root, _ = setup
    src = AutoModelForCausalLM.from_pretrained(dirs[model_name], dtype=torch.float32).state_dict()
    back = AutoModelForCausalLM.from_pretrained(os.path.join(out_root, model_name), dtype=torch.float32).state_dict()
    assert sorted(src) == sorted(back)
    for name in src:
        assert torch.equal(src[name], back[name]), name


def test_tp_attributes_and_layer_indices(setup):
    _, _, results = setup
    attrs = results[0][("attrs", "llama_gqa_llama3", 0)]  # tp rank 0, stage 0 of (tp2, pp2)
    assert attrs["embed_tokens.weight"][:2] == (True, 0)
    assert attrs["layers.0.self_attn.q_proj.weight"][:2] == (True, 0)
    assert attrs["layers.0.self_attn.o_proj.weight"][:2] == (True, 1)
    assert attrs["layers.0.mlp.down_proj.weight"][:2] == (True, 1)
    assert attrs["layers.0.input_layernorm.weight"][:2] == (None, None)  # replicated: unmarked
    last = results[2][("attrs", "llama_gqa_llama3", 2)]
    assert last["lm_head.weight"][:2] == (True, 0) and last["norm.weight"][0] is None
    assert results[0][("layer_idx", "llama_gqa_llama3")] == [0, 1]
    assert results[2][("layer_idx", "llama_gqa_llama3")] == [2]  # 3 layers over 2 stages: 2 + 1
    tied_first = results[0][("attrs", "qwen3_tied_qknorm", 0)]
    tied_last = results[2][("attrs", "qwen3_tied_qknorm", 2)]
    assert tied_first["embed_tokens.weight"][2] and tied_last["lm_head.weight"][2]  # shared_embedding copies
    assert tied_first["layers.0.self_attn.q_norm.weight"][0] is None


def test_value_head_shape_determinism_tp_invariance(setup):
    _, _, results = setup
    ids, mask = batch()
    ref = results[0][("values", "tp1pp1")]
    assert ref.shape == ids.shape and ref.dtype == torch.float32
    for res in results:
        for lname in ("tp1pp1", "tp2pp2"):
            assert torch.equal(res[("values", lname)], res[("values_again", lname)])
            assert (res[("values", lname)] - ref)[mask.bool()].abs().max() < TOL


def test_value_model_saves_as_token_classification(setup):
    from transformers import AutoModelForTokenClassification

    _, out_root, results = setup
    ids, mask = batch()
    model = AutoModelForTokenClassification.from_pretrained(os.path.join(out_root, "value"), dtype=torch.float32)
    with torch.no_grad():
        hf_values = model(input_ids=ids, attention_mask=mask).logits[..., 0]
    ours = results[0][("values", "tp2pp2")]
    assert (hf_values - ours)[mask.bool()].abs().max() < TOL


def test_random_init_is_layout_invariant(setup):
    _, _, results = setup
    _, mask = batch()
    a, b = results[0][("random_init", "tp1pp1")], results[3][("random_init", "tp2pp2")]
    assert torch.isfinite(a).all() and a[mask.bool()].abs().max() > 0
    assert (a - b)[mask.bool()].abs().max() < TOL
