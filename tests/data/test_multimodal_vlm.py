"""Data -> model: the tiny processor and the tiny Qwen2.5-VL in ONE directory; dataset items of the vision
task, left-padded, give our model the logits transformers' `Qwen2_5_VLForConditionalGeneration` gives.

Tolerance 1e-4 on logits, as tests/models/test_vlm.py argues it (fp32 both sides; reduction-order
differences stay ~1e-5 through 5 layers; a misplaced image row or a wrong pad count moves logits by O(0.1)).
"""

import torch
from transformers import AutoTokenizer

from verl_mega.apps import demo_vision_task as task
from verl_mega.data import RLDataset, left_pad, load_image_processor
from verl_mega.models import ModelConfig, build_stage, load_hf_weights
from verl_mega.models.mrope import mrope_position_ids
from verl_mega.parallel import Layout
from verl_mega.testing.tiny_vl_processor import save_tiny_vl_processor
from verl_mega.testing.tiny_vlm import make_tiny_qwen2_5_vl

TOL = 1e-4


def test_dataset_items_through_our_model_and_transformers(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model_dir = str(tmp_path / "tiny_vl")
    ids = save_tiny_vl_processor(model_dir, vocab_size=251)
    make_tiny_qwen2_5_vl(model_dir, seed=1, **ids)
    config = ModelConfig.from_hf(model_dir)
    assert (config.image_token_id, config.vision_start_token_id) == (ids["image_token_id"], ids["vision_start_token_id"])

    tok, ip = AutoTokenizer.from_pretrained(model_dir), load_image_processor(model_dir)
    rows, _ = task.make_vision_task(seed=2, num_train=3, num_heldout=1, sizes=(56, 84, 112))
    rows[0]["images"], rows[0]["prompt"] = [], [{"role": "user", "content": "no image"}]  # a text-only row too
    items = list(RLDataset(task.write_parquet(rows, str(tmp_path / "d.parquet")), tok, image_processor=ip))
    input_ids, mask = left_pad([it["prompt_ids"] for it in items], tok.pad_token_id)
    pixel_values = torch.cat([it["pixel_values"] for it in items])  # row order
    grid = torch.cat([it["image_grid_thw"] for it in items])
    assert grid.shape[0] == 2 and (input_ids == ids["image_token_id"]).sum() == pixel_values.shape[0] // 4

    stage = build_stage(config, Layout.create(1, 1), init_seed=None)
    load_hf_weights(stage, model_dir)
    pos, _ = mrope_position_ids(input_ids, grid, mask, image_token_id=ids["image_token_id"],
                                vision_start_token_id=ids["vision_start_token_id"], spatial_merge_size=ip.merge_size)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = stage.eval()(input_ids, pos, mask, pixel_values=pixel_values, image_grid_thw=grid)
        ours = ours[..., : stage.true_vocab_size]
        ref = hf(input_ids=input_ids, attention_mask=mask, pixel_values=pixel_values, image_grid_thw=grid,
                 mm_token_type_ids=(input_ids == ids["image_token_id"]).int()).logits
    real = mask.bool()
    assert ref[real].abs().max() > 1.0 and (ours - ref)[real].abs().max() < TOL
