"""The vision demo's task: seeded generator, answers checked from the pixels, reward, verl parquet via RLDataset."""

import io

import numpy as np
import pytest
from PIL import Image
from transformers import AutoTokenizer

from verl_mega.apps import demo_vision_task as task
from verl_mega.data import RLDataset
from verl_mega.data.multimodal import load_image_processor
from verl_mega.testing.tiny_vl_processor import save_tiny_vl_processor


def pixels(row):
    return np.asarray(Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB"))


def test_generator_is_deterministic_and_splits_are_disjoint():
    a_train, a_held = task.make_vision_task(seed=3, num_train=40, num_heldout=10)
    b_train, b_held = task.make_vision_task(seed=3, num_train=40, num_heldout=10)
    assert a_train == b_train and a_held == b_held  # image bytes included
    assert task.make_vision_task(seed=4, num_train=40, num_heldout=10)[0] != a_train
    key = lambda r: (r["images"][0]["bytes"], r["prompt"][0]["content"])
    assert len({key(r) for r in a_train + a_held}) == 50
    assert [r["extra_info"]["index"] for r in a_held] == list(range(10))
    assert {r["extra_info"]["split"] for r in a_train} == {"train"} and {r["extra_info"]["split"] for r in a_held} == {"test"}


def test_answers_match_the_drawn_pixels():
    """Counted independently of the generator: cells (28 px) holding any pixel of the asked colour."""
    train, _ = task.make_vision_task(seed=0, num_train=60, num_heldout=1, asked=("red", "blue"))
    answers = set()
    for row in train:
        img = pixels(row)
        size = row["extra_info"]["size"]
        assert img.shape == (size, size, 3) and size in task.SIZES
        asked = row["prompt"][0]["content"].split()[2]
        assert row["prompt"][0]["content"] == f"<image>How many {asked} squares?" and asked in ("red", "blue")
        hit = np.all(img == task.COLOURS[asked], axis=-1)  # [H, W]
        cells = hit.reshape(size // 28, 28, size // 28, 28).any(axis=(1, 3))
        coloured = np.any(img != 255, axis=-1).reshape(size // 28, 28, size // 28, 28).any(axis=(1, 3))
        assert row["reward_model"]["ground_truth"] == task.answer(row) == str(int(cells.sum()))
        assert int(coloured.sum()) == row["extra_info"]["squares"] >= 1
        answers.add(task.answer(row))
    assert answers == {"0", "1", "2", "3", "4"}


def test_reward_is_exact_match_on_the_answer_digit():
    assert task.compute_score("2", "2") == task.compute_score(" 2\n", "2") == 1.0
    assert task.compute_score("12", "2") == task.compute_score("2 squares", "2") == task.compute_score("", "0") == 0.0


def test_parquet_through_the_multimodal_dataset(tmp_path):
    save_tiny_vl_processor(str(tmp_path / "proc"))
    tok, ip = AutoTokenizer.from_pretrained(str(tmp_path / "proc")), load_image_processor(tmp_path / "proc")
    train, _ = task.make_vision_task(seed=1, num_train=12, num_heldout=3)
    ds = RLDataset(task.write_parquet(train, str(tmp_path / "train.parquet")), tok, image_processor=ip)
    assert len(ds) == 12 and ds.skipped == 0
    for k, row in enumerate(train):
        side = row["extra_info"]["size"] // 14  # patches a side
        item = ds[k]
        assert item["image_grid_thw"].tolist() == [[1, side, side]]
        assert item["pixel_values"].shape == (side * side, 3 * 2 * 14 * 14)
        assert item["prompt_ids"].count(5) == side * side // 4  # one <|image_pad|> per 2x2 merged patch = cell
        assert item["ground_truth"] == task.answer(row) and item["data_source"] == task.DATA_SOURCE
        assert len(tok.encode(item["ground_truth"], add_special_tokens=False)) == 1  # a one-token answer


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_train and num_heldout must be >= 1"):
        task.make_vision_task(num_train=0)
    with pytest.raises(ValueError, match="must hold a colour besides the asked 'red'"):
        task.make_vision_task(num_train=2, num_heldout=1, colours=("red",))
