"""RLDataset: verl parquet and jsonl rows, chat template, validation with file/row, length filtering."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from verl_mega.data import RLDataset
from verl_mega.data.dataset import row_messages


def verl_row(content, truth="3", source="openai/gsm8k", index=0):
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": content}],
        "ability": "math",
        "reward_model": {"ground_truth": truth, "style": "rule"},
        "extra_info": {"split": "train", "index": index},
    }


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_parquet_verl_format(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "train.parquet", [verl_row("one plus two", "3"), verl_row("two plus two", "4", index=1)])
    ds = RLDataset(path, tokenizer)
    assert len(ds) == 2 and ds.skipped == 0 and ds.filtered == 0
    item = ds[0]
    assert item["prompt_text"] == "<user> one plus two <assistant>"
    assert item["prompt_ids"] == [3, 11, 12, 13, 5]
    assert item["messages"] == item["prompt"] == [{"role": "user", "content": "one plus two"}]
    assert (item["data_source"], item["ground_truth"], item["index"]) == ("openai/gsm8k", "3", 0)
    assert item["extra_info"] == {"split": "train", "index": 0}
    assert ds[1]["ground_truth"] == "4" and ds[1]["index"] == 1


def test_jsonl_string_prompt_messages_and_plain_template(tmp_path, tokenizer, plain_tokenizer):
    path = tmp_path / "d.jsonl"
    rows = [
        {"prompt": "what is one", "ground_truth": "1"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two"}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = RLDataset(path, tokenizer)
    assert ds[0]["prompt_text"] == "<user> what is one <assistant>" and ds[0]["ground_truth"] == "1"
    assert ds[1]["prompt_text"] == "<system> be brief <user> two <assistant>" and ds[1]["data_source"] is None
    plain = RLDataset(path, plain_tokenizer)  # no chat template: "role: content" lines
    assert plain[0]["prompt_text"] == "user: what is one\nassistant: "
    assert plain[0]["prompt_ids"] == [6, 9, 10, 11, 8]
    raw = RLDataset(path, tokenizer, apply_chat_template=False)  # string prompt used as is
    assert raw[0]["prompt_text"] == "what is one"


def test_row_messages_shapes():
    """The one "row's prompt as chat messages" used by RLDataset and `verl-mega generate`'s image rows."""
    assert row_messages({"prompt": "hi"}, "prompt") == [{"role": "user", "content": "hi"}]
    chat = [{"role": "system", "content": "s", "name": "x"}, {"role": "user", "content": "u"}]
    assert row_messages({"q": chat}, "q") == [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert row_messages({"messages": chat[1:]}, "prompt") == [{"role": "user", "content": "u"}]  # fallback column
    with pytest.raises(ValueError, match=r"no 'prompt' \(or 'messages'\) column"):
        row_messages({"question": "x"}, "prompt")


def test_malformed_parquet_row_named_or_skipped(tmp_path, tokenizer):
    rows = [verl_row("one"), verl_row("two"), verl_row("three")]
    rows[1]["prompt"] = []  # empty chat
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(ValueError, match=r"bad\.parquet: row 1: 'prompt' must be a non-empty list"):
        RLDataset(path, tokenizer)
    ds = RLDataset(path, tokenizer, skip_malformed=True)
    assert ds.skipped == 1 and [it["index"] for it in ds] == [0, 2]


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"prompt": [{"role": "user"}]}, "message 0 must be a dict with string 'role' and 'content'"),
        ({"prompt": 3}, "must be a non-empty list"),
        ({"prompt": "  "}, "'prompt' is an empty string"),
        ({"prompt": [{"role": "system", "content": ""}, {"role": "user", "content": " "}]}, "'prompt' has no text"),
        ({"question": "x"}, "no 'prompt'"),
        ({"prompt": "x", "extra_info": [1]}, "must be dicts"),
        ("not json", "invalid JSON"),
        ([1, 2], "not an object"),
    ],
)
def test_malformed_jsonl_rows(tmp_path, tokenizer, bad, match):
    path = tmp_path / "rows.jsonl"
    bad_line = bad if isinstance(bad, str) else json.dumps(bad)
    path.write_text(json.dumps({"prompt": "one"}) + "\n" + bad_line + "\n")
    with pytest.raises(ValueError, match=rf"rows\.jsonl: row 1: .*{match}"):
        RLDataset(path, tokenizer)
    assert RLDataset(path, tokenizer, skip_malformed=True).skipped == 1


def test_length_filter_and_truncation(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "t.parquet", [verl_row("one"), verl_row("one two three four five")])
    # lengths with template: 3 and 7 tokens
    ds = RLDataset(path, tokenizer, max_prompt_length=5)
    assert len(ds) == 1 and ds.filtered == 1
    with pytest.raises(ValueError, match=r"t\.parquet: row 1: prompt has 7 tokens > max_prompt_length=5"):
        RLDataset(path, tokenizer, max_prompt_length=5, filter_overlong=False)
    left = RLDataset(path, tokenizer, max_prompt_length=5, filter_overlong=False, truncation="left")
    assert left[1]["prompt_ids"] == [13, 14, 15, 16, 5]
    assert len(RLDataset([path, path], tokenizer)) == 4  # several files concatenate


def test_bad_paths(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="does not exist"):
        RLDataset(tmp_path / "none.parquet", tokenizer)
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match="unsupported file type"):
        RLDataset(tmp_path / "x.csv", tokenizer)
