"""`verl-mega generate` with a vision-language model: a multimodal parquet (verl's `images` column) is read with
the model's image processor and each row generates from its own images. The CLI's encoding and batching are
checked against the dataset's encoding of the same rows fed to the engine directly (the engine's greedy decoding
with images equals transformers': tests/rollout/test_vlm_generation.py). Bad rows: an error naming file and row."""

import json
import os

import pytest

from verl_mega.apps import demo_vision_task as task
from verl_mega.apps.cli import main

MAX_NEW = 6


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    from verl_mega.testing.tiny_vl_processor import save_tiny_vl_processor
    from verl_mega.testing.tiny_vlm import make_tiny_qwen2_5_vl

    path = str(tmp_path_factory.mktemp("tiny_vl_generate"))
    make_tiny_qwen2_5_vl(path, seed=5, **save_tiny_vl_processor(path))
    return path


def _args(model, inp, out, *extra):
    return ["generate", "--model", model, "--prompts", inp, "--out", out, "--max-new-tokens", str(MAX_NEW), *extra]


def test_generate_reads_each_rows_images(vlm_dir, tmp_path):
    from verl_mega.data import RLDataset, load_image_processor
    from verl_mega.rollout import get_actor_model

    rows, _ = task.make_vision_task(seed=2, num_train=5, num_heldout=1, sizes=(56, 84, 112))
    data = task.write_parquet(rows, str(tmp_path / "in.parquet"))
    out = str(tmp_path / "out.jsonl")
    assert main(_args(vlm_dir, data, out, "--temperature", "0", "--batch-size", "2")) == 0  # rows span batches
    lines = [json.loads(line) for line in open(out)]
    assert [line["extra_info"]["index"] for line in lines] == [r["extra_info"]["index"] for r in rows]  # order kept
    # image bytes are summarised, not written as str(bytes) (a b'\\x89PNG...' string of ~4x the size)
    assert [line["images"] for line in lines] == [[{"path": None, "num_bytes": len(r["images"][0]["bytes"])}]
                                                  for r in rows]

    actor = get_actor_model(vlm_dir)
    dataset = RLDataset(data, actor.tokenizer, image_processor=load_image_processor(vlm_dir))
    items = [dataset[k] for k in range(len(dataset))]
    assert len({len(it["prompt_ids"]) for it in items}) >= 2  # rows of different image sizes (4, 9 or 16 tokens)
    ref = actor.generate([it["prompt_ids"] for it in items], max_new_tokens=MAX_NEW, temperature=0.0,
                         images=[(it["pixel_values"], it["image_grid_thw"]) for it in items])
    assert [line["response_ids"] for line in lines] == [[s["response_ids"]] for s in ref]
    # the images matter: the same prompts with the images swapped between rows generate something else
    swapped = actor.generate([it["prompt_ids"] for it in items[:2]], max_new_tokens=MAX_NEW, temperature=0.0,
                             images=[(it["pixel_values"] * -1.0, it["image_grid_thw"]) for it in items[:2]])
    assert [s["response_ids"] for s in swapped] != [s["response_ids"] for s in ref[:2]]


def test_generate_image_errors_name_file_and_row(vlm_dir, hf_dir, tmp_path, capsys):
    rows, _ = task.make_vision_task(seed=2, num_train=3, num_heldout=1, sizes=(56,))
    rows[1]["images"] = [{"bytes": b"not an image"}]
    bad = task.write_parquet(rows, str(tmp_path / "bad.parquet"))
    out = str(tmp_path / "out.jsonl")
    assert main(_args(vlm_dir, bad, out)) == 2
    err = capsys.readouterr().err
    assert "bad.parquet: row 1:" in err and "Traceback" not in err, err
    good = task.write_parquet(rows[:1], str(tmp_path / "good.parquet"))
    assert main(_args(hf_dir, good, out)) == 2  # a text model given images
    assert "good.parquet: row 0 has images but the model" in capsys.readouterr().err
    # <image> markers without images (here: the images in an "image" column) are an error, as in training; they
    # were generated from as literal text
    for k, row in enumerate(rows):
        row["image"] = row.pop("images")
        row["prompt"][0]["content"] = row["prompt"][0]["content"] if k != 2 else "no marker here"
    singular = task.write_parquet(rows, str(tmp_path / "singular.parquet"))
    assert main(_args(vlm_dir, singular, out)) == 2
    assert "singular.parquet: row 0: the prompt has 1 <image> markers but the row has no 'images' column " \
           "(columns: ['data_source', 'extra_info', 'image', 'prompt', 'reward_model'])" in capsys.readouterr().err
    assert not os.path.exists(out)  # nothing written on error
