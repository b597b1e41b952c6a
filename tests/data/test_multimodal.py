"""Multimodal rows: the tiny Qwen2.5-VL processor, verl's image column (bytes / paths), malformed images."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from verl_mega.data import RLDataset, get_dataloader
from verl_mega.data.multimodal import IMAGE_PLACEHOLDER, encode_vision_prompt, load_image_processor
from verl_mega.testing.tiny_vl_processor import save_tiny_vl_processor

PATCH_DIM = 3 * 2 * 14 * 14  # C * temporal_patch * patch * patch


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_vl")
    ids = save_tiny_vl_processor(str(path), vocab_size=131)
    return path, ids


@pytest.fixture(scope="module")
def tok_and_ip(vl_dir):
    return AutoTokenizer.from_pretrained(str(vl_dir[0])), load_image_processor(vl_dir[0])


def png(size, color=(255, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def row(content, images, truth="1"):
    return {"prompt": [{"role": "user", "content": content}], "images": images, "data_source": "vision",
            "reward_model": {"ground_truth": truth, "style": "rule"}, "extra_info": {"split": "test"}}


def write(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_tiny_processor_files_ids_and_image_tokens(vl_dir, tok_and_ip):
    path, ids = vl_dir
    tok, ip = tok_and_ip
    assert ids == dict(vocab_size=131, eos_token_id=2, pad_token_id=0, bos_token_id=None, image_token_id=5,
                       video_token_id=6, vision_start_token_id=3, vision_end_token_id=4)
    assert (tok.eos_token_id, tok.pad_token_id, len(tok), tok.padding_side) == (2, 0, 104, "left")
    assert type(ip).__name__ == "Qwen2VLImageProcessorPil" and ip.merge_size == 2
    assert '"processor_class": "Qwen2_5_VLProcessor"' in (path / "processor_config.json").read_text()
    text = tok.apply_chat_template([{"role": "user", "content": IMAGE_PLACEHOLDER + "Hi"}], add_generation_prompt=True,
                                   tokenize=False)
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # lossless, specials kept whole
    # 112x112 -> 8x8 patches of 14 -> 16 tokens after the 2x2 merge; 84x56 (h x w) -> 6x4 patches -> 6 tokens;
    # 200x200 is above max_pixels = 112*112 and is scaled down to 112x112.
    out = ip(images=[Image.new("RGB", (112, 112)), Image.new("RGB", (56, 84)), Image.new("RGB", (200, 200))],
             return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 8, 8], [1, 6, 4], [1, 8, 8]]
    assert out["pixel_values"].shape == (64 + 24 + 64, PATCH_DIM)


def test_parquet_images_as_bytes_and_as_paths(tmp_path, tok_and_ip):
    tok, ip = tok_and_ip
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png((112, 112)))
    (tmp_path / "img" / "b.png").write_bytes(png((56, 84), (0, 0, 255)))
    question = "<image>How many? <image>"
    by_bytes = write(tmp_path / "bytes.parquet", [row(question, [{"bytes": png((112, 112))},
                                                                 {"bytes": png((56, 84), (0, 0, 255))}])])
    by_path = write(tmp_path / "paths.parquet", [row(question, [{"path": "img/a.png"},  # relative to the file
                                                                {"path": str(tmp_path / "img" / "b.png")}])])
    by_string = write(tmp_path / "strings.parquet", [row(question, ["img/a.png", f"file://{tmp_path}/img/b.png"])])
    items = [RLDataset(p, tok, image_processor=ip)[0] for p in (by_bytes, by_path, by_string)]
    first = items[0]
    assert first["image_grid_thw"].tolist() == [[1, 8, 8], [1, 6, 4]]
    assert first["pixel_values"].shape == (64 + 24, PATCH_DIM) and first["pixel_values"].dtype == torch.float32
    ids = first["prompt_ids"]
    start = tok.encode("<|im_start|>user\n", add_special_tokens=False)
    assert ids[:len(start)] == start
    assert ids[len(start):len(start) + 18] == [3] + [5] * 16 + [4]  # vision_start, 16 image pads, vision_end
    assert ids.count(5) == 16 + 6 and first["prompt_text"].count(IMAGE_PLACEHOLDER) == 2
    assert first["messages"][0]["content"] == question  # the row's messages as given
    for other in items[1:]:
        assert other["prompt_ids"] == ids
        torch.testing.assert_close(other["pixel_values"], first["pixel_values"], rtol=0, atol=0)
        torch.testing.assert_close(other["image_grid_thw"], first["image_grid_thw"], rtol=0, atol=0)
    assert items[1]["images"][0] == {"path": str(tmp_path / "img" / "a.png")}  # made absolute


def test_rows_with_zero_one_two_images_and_loader(tmp_path, tok_and_ip):
    tok, ip = tok_and_ip
    rows = [row("no image", None), row("<image>one", [{"bytes": png((56, 56))}]),
            row("<image><image>two", [{"bytes": png((56, 56))}, {"bytes": png((112, 56))}])]
    ds = RLDataset(write(tmp_path / "mixed.parquet", rows), tok, image_processor=ip)
    assert [ds[k]["image_grid_thw"].tolist() for k in range(3)] == [[], [[1, 4, 4]], [[1, 4, 4], [1, 4, 8]]]
    assert [tuple(ds[k]["pixel_values"].shape) for k in range(3)] == [(0, PATCH_DIM), (16, PATCH_DIM),
                                                                       (48, PATCH_DIM)]
    assert [ds[k]["prompt_ids"].count(5) for k in range(3)] == [0, 4, 12]
    (batch,) = list(get_dataloader(tmp_path / "mixed.parquet", tok, 3, shuffle=False, image_processor=ip))
    assert [it["index"] for it in batch] == [0, 1, 2] and batch[2]["pixel_values"].shape == (48, PATCH_DIM)


@pytest.mark.parametrize("suffix, images, content, message", [
    ("parquet", [{"path": "missing.png"}], "<image>", "missing.png does not exist"),
    ("parquet", [{"bytes": b"not a png"}], "<image>", "9 image bytes could not be decoded as an image \\(not a format PIL reads\\)"),
    ("parquet", [{"bytes": png((56, 56))[:60]}], "<image>", "could not be decoded"),  # truncated file
    ("parquet", [{"bytes": png((402, 2))}], "<image>", "aspect ratio must be smaller than 200"),  # processor's
    ("parquet", [{"bytes": png((56, 56))}], "<image><image>", "2 <image> markers but the row has 1 images"),
    ("parquet", [{"bytes": png((56, 56))}], "no marker", "0 <image> markers but the row has 1 images"),
    ("jsonl", [{"path": "a.png"}, 3], "<image><image>", "image 1: an image must be"),  # jsonl keeps bad types
    ("jsonl", "a.png", "<image>", "'images' must be a list"),
    ("jsonl", ["https://example.com/a.png"], "<image>", "is a URL: images are not downloaded"),
    ("jsonl", ["data:image/png;base64,!!"], "<image>", "image data URI data:image/png;base64,!!... is not valid base64"),
    ("jsonl", ["x" * 10000], "<image>", r"x{20}\.\.\. cannot be looked up \(File name too long\); a base64 image "
                                        "needs the 'data:image/png;base64,' prefix"),  # raw base64: cut in the message
    ("jsonl", None, "<image>", r"1 <image> markers but the row has no 'images' column \(columns: \['data_source', "
                               r"'extra_info', 'prompt', 'reward_model'\]\)"),  # None: the column is left out
])
def test_malformed_image_rows_name_file_and_row(tmp_path, tok_and_ip, suffix, images, content, message):
    tok, ip = tok_and_ip
    (tmp_path / "a.png").write_bytes(png((56, 56)))
    rows = [row("<image>ok", [{"path": "a.png"}]), row(content, images)]
    if images is None:
        del rows[1]["images"]
    path = tmp_path / f"bad.{suffix}"
    if suffix == "parquet":
        write(path, rows)
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=rf"bad.{suffix}: row 1: .*{message}"):
        RLDataset(path, tok, image_processor=ip)
    ds = RLDataset(path, tok, image_processor=ip, skip_malformed=True)
    assert (len(ds), ds.skipped, ds[0]["image_grid_thw"].tolist()) == (1, 1, [[1, 4, 4]])


def test_base64_data_uri_images(tmp_path, tok_and_ip):
    """A "data:image/png;base64,..." entry (as qwen_vl_utils, verl's image reader, accepts) reads as its bytes."""
    import base64

    tok, ip = tok_and_ip
    uri = "data:image/png;base64," + base64.b64encode(png((84, 112))).decode()
    (tmp_path / "a.png").write_bytes(png((84, 112)))
    rows = [row("<image>count", [uri]), row("<image>count", [{"path": uri}]), row("<image>count", [{"path": "a.png"}])]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = RLDataset(tmp_path / "d.jsonl", tok, image_processor=ip)
    assert torch.equal(ds[0]["pixel_values"], ds[2]["pixel_values"]) and torch.equal(ds[1]["pixel_values"], ds[2]["pixel_values"])


def test_image_over_pils_pixel_limit_is_a_malformed_row(tmp_path, tok_and_ip, monkeypatch):
    """PIL refuses images over 2 x Image.MAX_IMAGE_PIXELS (its decompression-bomb guard, 179M pixels by
    default) with its own exception; the row is named like any other bad image. The limit is lowered here
    so that a 56 x 56 image (3136 pixels > 2 x 1000) trips it without a huge file."""
    tok, ip = tok_and_ip
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = write(tmp_path / "big.parquet", [row("<image>count", [{"bytes": png((56, 56))}])])
    with pytest.raises(ValueError, match=r"big.parquet: row 0: image 0: .*too large to decode.*downscale"):
        RLDataset(path, tok, image_processor=ip)
    assert RLDataset(path, tok, image_processor=ip, skip_malformed=True).skipped == 1


def test_images_without_image_processor_and_overlong_image_prompt(tmp_path, tok_and_ip):
    tok, ip = tok_and_ip
    path = write(tmp_path / "d.parquet", [row("<image>count", [{"bytes": png((112, 112))}])])
    with pytest.raises(ValueError, match=r"d.parquet: row 0 has 'images': pass image_processor="):
        RLDataset(path, tok)
    assert RLDataset(path, tok, image_processor=ip, max_prompt_length=20).filtered == 1  # 16 pads + text > 20
    with pytest.raises(ValueError, match=r"row 0: prompt has \d+ tokens > max_prompt_length=20"):
        RLDataset(path, tok, image_processor=ip, max_prompt_length=20, filter_overlong=False, truncation="left")


def test_encode_vision_prompt_equals_the_dataset_item(tmp_path, tok_and_ip):
    tok, ip = tok_and_ip
    (tmp_path / "a.png").write_bytes(png((84, 112)))
    messages = [{"role": "system", "content": "Count."}, {"role": "user", "content": "<image>How many?"}]
    item = RLDataset(write(tmp_path / "d.parquet", [{**row("", ["a.png"]), "prompt": messages}]), tok,
                     image_processor=ip)[0]
    out = encode_vision_prompt(tok, ip, messages, [str(tmp_path / "a.png")])
    assert out["prompt_ids"] == item["prompt_ids"] and out["prompt_text"] == item["prompt_text"]
    torch.testing.assert_close(out["pixel_values"], item["pixel_values"], rtol=0, atol=0)
    assert out["image_grid_thw"].tolist() == item["image_grid_thw"].tolist() == [[1, 8, 6]]
    with pytest.raises(ValueError, match="image 0: image file .*nothing.png does not exist"):
        encode_vision_prompt(tok, ip, messages, ["nothing.png"], base_dir=tmp_path)
