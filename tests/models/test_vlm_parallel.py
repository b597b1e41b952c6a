"""Qwen2.5-VL (tied) across layouts in one 2-rank gloo spawn: logits at (tp, pp) = (1,1), (2,1), (2,1)+SP, (1,2);
save_hf -> transformers from tp 2 and pp 2; loaded parameters identical at tp 1 and 2; the replicated
vision tower gets identical (and correct) gradients on every TP rank.

Reference and tolerance as in test_vlm.py (fp32, TOL = 1e-4 absolute on logits ~5; TP all-reduces
only reorder fp32 sums). Gradients: the vision weights' gradients of L = sum(logits * R) (R fixed
random) at tp 2 must equal each other exactly (replicated computation on identical inputs and
identical incoming gradients) and the tp 1 gradient within GRAD_TOL = 1e-4 relative to its max (the
same reordering argument, on gradient sums over ~100 positions).
"""

import os

import pytest
import torch
import torch.distributed as dist

from verl_mega.testing import run_distributed
from verl_mega.testing.tiny_vlm import TINY_VLM_DEFAULTS, make_tiny_qwen2_5_vl, tiny_vlm_batch

TOL = 1e-4
GRAD_TOL = 1e-4
IMG = TINY_VLM_DEFAULTS["image_token_id"]
LAYOUTS = {"tp1pp1": (1, 1, False), "tp2pp1": (2, 1, False), "tp2pp1_sp": (2, 1, True), "tp1pp2": (1, 2, False)}
VISION_PARAMS = ("visual.patch_embed.proj.weight", "visual.blocks.0.attn.qkv.weight",
                 "visual.blocks.1.mlp.up_proj.bias", "visual.merger.mlp.0.weight", "visual.merger.ln_q.weight")


def _positions(batch):
    from verl_mega.models.mrope import mrope_position_ids

    return mrope_position_ids(batch["input_ids"], batch["image_grid_thw"], batch["attention_mask"],
                              image_token_id=IMG, spatial_merge_size=2)[0]


def _stage_output(stage, layout, batch, pos):
    """Run the pipeline; this stage's output on the last stage, None elsewhere."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if layout.is_first_stage:
        out = stage(ids, pos, mask, pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    else:
        hidden = torch.empty(*ids.shape, stage.config.hidden_size)
        dist.recv(hidden, src=layout.prev_stage_rank)
        out = stage(hidden, pos, mask)
    if not layout.is_last_stage:
        dist.send(out.detach().contiguous(), dst=layout.next_stage_rank)
        return None
    return out


def _full_logits(stage, layout, out, shape):
    """[B, S, vocab] on every rank: vocab shards gathered over tp, broadcast from the last stage."""
    full = torch.empty(*shape, stage.config.vocab_size)
    if layout.is_last_stage:
        shard = out.detach().contiguous()
        if layout.tp > 1:
            parts = [torch.empty_like(shard) for _ in range(layout.tp)]
            dist.all_gather(parts, shard, group=layout.tp_group)
            shard = torch.cat(parts, dim=-1)
        full.copy_(shard[..., : stage.config.vocab_size])
    if layout.pp > 1:
        dist.broadcast(full, src=layout.last_stage_rank, group=layout.pp_group)
    return full


def _vision_grads(stage, layout, out):
    """Gradients of the vision weights for L = sum(logits * R), R [B, S, V_pad] fixed; this rank's vocab slice."""
    r = torch.randn(*out.shape[:2], stage.padded_vocab_size, generator=torch.Generator().manual_seed(5))
    start = stage.vocab_start_index
    (out * r[..., start:start + out.shape[-1]]).sum().backward()
    params = dict(stage.named_parameters())
    return {name: params[name].grad.clone() for name in VISION_PARAMS}


def _rank_main(path: str, out_root: str) -> dict:
    from verl_mega.models import ModelConfig, build_stage, load_hf_weights, save_hf
    from verl_mega.models.hf_io import full_tensor
    from verl_mega.models.parallelize import apply_sequence_parallel
    from verl_mega.parallel import Layout

    config = ModelConfig.from_hf(path)
    batch = tiny_vlm_batch()
    pos = _positions(batch)
    res = {}
    for name, (tp, pp, sp) in LAYOUTS.items():
        layout = Layout.create(tp, pp)
        stage = build_stage(config, layout, init_seed=None)
        load_hf_weights(stage, path)
        apply_sequence_parallel(stage, sp)
        with torch.no_grad():
            out = _stage_output(stage, layout, batch, pos)
        res[("logits", name)] = _full_logits(stage, layout, out, batch["input_ids"].shape)
        if pp == 1:  # vision gradients (the tower sits on the only stage)
            res[("grads", name)] = _vision_grads(stage, layout, _stage_output(stage, layout, batch, pos))
        if name in ("tp1pp1", "tp2pp1"):  # the loaded parameters, TP shards gathered
            res[("params", name)] = {stage.hf_name(n): full_tensor(stage, n, p, layout)
                                     for n, p in stage.named_parameters()}
            res[("attrs", name)] = {n: getattr(p, "tensor_model_parallel", False)
                                    for n, p in stage.named_parameters() if n.startswith("visual.")}
        if name in ("tp2pp1", "tp1pp2"):
            save_hf(stage, layout, os.path.join(out_root, name), config)
    return res


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm_par")
    path = make_tiny_qwen2_5_vl(str(root / "src"), seed=4, tie=True)  # tied, as Qwen2.5-VL-3B (test_vlm.py: untied)
    out_root = str(root / "saved")
    return path, out_root, run_distributed(_rank_main, 2, path, out_root, timeout_s=240)


def test_logits_match_transformers_every_layout_every_rank(setup):
    from transformers import Qwen2_5_VLForConditionalGeneration

    path, _, results = setup
    batch = tiny_vlm_batch()
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    ids = batch["input_ids"]
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
                 image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=(ids == IMG).int()).logits
    real = batch["attention_mask"].bool()
    assert ref[real].abs().max() > 1.0
    for name in LAYOUTS:
        for rank, res in enumerate(results):
            err = (res[("logits", name)] - ref)[real].abs().max().item()
            assert err < TOL, f"{name} rank {rank}: max abs error {err}"


@pytest.mark.parametrize("layout", ["tp2pp1", "tp1pp2"])
def test_save_hf_round_trip(setup, layout):
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    path, out_root, _ = setup
    saved = os.path.join(out_root, layout)
    assert sorted(load_file(os.path.join(saved, "model.safetensors"))) == sorted(
        load_file(os.path.join(path, "model.safetensors")))  # the same (old-style) checkpoint names
    src = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).state_dict()
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(saved, dtype=torch.float32).state_dict()
    assert sorted(src) == sorted(back)
    for name in src:
        assert torch.equal(src[name], back[name]), name


def test_loaded_parameters_identical_at_tp1_and_tp2(setup):
    from safetensors.torch import load_file

    path, _, results = setup
    file = load_file(os.path.join(path, "model.safetensors"))
    tp1, tp2 = results[0][("params", "tp1pp1")], results[0][("params", "tp2pp1")]
    assert sorted(tp1) == sorted(tp2) == sorted(file)
    for name in file:
        assert torch.equal(tp1[name], file[name]) and torch.equal(tp2[name], file[name]), name
    for rank in (0, 1):  # the tower is replicated: no TP attribute, the same tensors on both ranks
        assert not any(results[rank][("attrs", "tp2pp1")].values())
        assert all(torch.equal(results[rank][("params", "tp2pp1")][n], tp1[n]) for n in tp1 if n.startswith("visual."))


def test_replicated_vision_tower_gets_identical_correct_grads(setup):
    _, _, results = setup
    ref = results[0][("grads", "tp1pp1")]
    for name in ("tp2pp1", "tp2pp1_sp"):
        g0, g1 = results[0][("grads", name)], results[1][("grads", name)]
        for p in VISION_PARAMS:
            assert torch.equal(g0[p], g1[p]), (name, p)
            scale = ref[p].abs().max()
            assert scale > 0 and (g0[p] - ref[p]).abs().max() < GRAD_TOL * scale, (name, p)
