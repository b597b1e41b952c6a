"""RL prompt dataset: verl's parquet format (or jsonl with the same keys), validated, templated, tokenized.

Reference: verl's `RLHFDataset` (`verl/utils/dataset/rl_dataset.py`) and its data preprocessing
scripts (`examples/data_preprocess/gsm8k.py`): one row per prompt with columns
    prompt        list of chat messages [{"role": ..., "content": ...}]
    data_source   e.g. "openai/gsm8k" (selects the rule reward)
    reward_model  {"ground_truth": ..., "style": "rule"}
    extra_info    free-form dict (split, index, ...)
    images        (multimodal rows) a list of {"bytes": ...} / {"path": ...} / path strings, one per
                  `<image>` marker in the prompt (verl's geo3k format)
jsonl rows may also give `prompt` as a plain string (one user turn) or `messages` instead of
`prompt`, and `ground_truth` at top level.

Given an `image_processor` (transformers' Qwen2-VL one, `data.multimodal.load_image_processor`), rows
with images are multimodal: every image is decoded and processed at construction (a missing file,
undecodable bytes or a marker/image count mismatch is a malformed row), `<image>` markers become the
vision placeholder, each <|image_pad|> is expanded to the image's token count (`data.multimodal`), and
an item carries `images`, `image_grid_thw` and, computed on access (fp32 patches are much larger than
the encoded images), `pixel_values`.

Every row is checked up front; a malformed row is a `ValueError` naming the file and row, or, with
`skip_malformed=True`, skipped and counted in `dataset.skipped`. Prompts longer than
`max_prompt_length` tokens are dropped and counted in `dataset.filtered` (verl's
`filter_overlong_prompts`), or else truncated / rejected per `truncation`.

Simplifications: the whole file is read and tokenized at construction (fine for RL prompt sets of
up to a few hundred thousand rows); images only (no video); a prompt with images is never truncated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from verl_mega.data import multimodal
from verl_mega.data.text import encode_text


def read_rows(path: Path) -> list[Any]:
    """Rows of a .parquet or .jsonl file; an unparsable jsonl line is returned as a _BadRow."""
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        rows: list[Any] = []
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    rows.append(_BadRow(f"invalid JSON ({e.msg} at column {e.colno})"))
        return rows
    raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use .parquet or .jsonl)")


class _BadRow:
    def __init__(self, reason: str):
        self.reason = reason


def row_prompt(row: dict, prompt_key: str) -> str | list[dict[str, str]]:
    """A row's prompt: a plain string as is, or its chat messages (validated, copied to {role, content});
    ValueError (without location) saying what is wrong."""
    key = prompt_key if prompt_key in row else "messages" if "messages" in row else None
    if key is None:
        raise ValueError(f"no {prompt_key!r} (or 'messages') column; columns: {sorted(row)}")
    prompt = row[key]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError(f"{key!r} is an empty string")
        return prompt
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError(f"{key!r} must be a non-empty list of chat messages or a string, got {prompt!r:.80}")
    for j, m in enumerate(prompt):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"{key!r} message {j} must be a dict with string 'role' and 'content', got {m!r:.80}")
    if not any(m["content"].strip() for m in prompt):
        raise ValueError(f"{key!r} has no text: every message's 'content' is empty, got {prompt!r:.80}")
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def row_messages(row: dict, prompt_key: str) -> list[dict[str, str]]:
    """A row's prompt as chat messages [{"role": str, "content": str}, ...] (copies).

    Accepted shapes of `row[prompt_key]` (or, without that column, `row["messages"]`): a non-empty list of
    dicts with string "role" and "content" (other keys are dropped), or a plain string, which becomes one
    user message. ValueError (without file or row: callers add them) for a missing column, an empty or
    non-list prompt, a message without string role/content, or a prompt with no text (blank contents)."""
    prompt = row_prompt(row, prompt_key)
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _plain_template(messages: list[dict[str, str]]) -> str:
    """`role: content` lines, then `assistant: ` as the generation prompt (for tokenizers without a template)."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


class RLDataset:
    """Prompts of one or more parquet/jsonl files as tokenized items.

    Item (dict): prompt_ids list[int], prompt_text str, messages / prompt (the chat messages),
    data_source str | None, ground_truth, reward_model dict, extra_info dict, index (row in its file).
    With an image_processor, also: images (the row's image entries, relative paths made absolute),
    image_grid_thw [N_img, 3] long, pixel_values [N_patches, C*T*P*P] float32 (N_img may be 0).

    Attributes: `skipped` (malformed rows skipped), `filtered` (overlong prompts dropped).
    """

    def __init__(
        self,
        path: str | Path | Sequence[str | Path],
        tokenizer: Any,
        *,
        prompt_key: str = "prompt",
        max_prompt_length: int | None = None,
        filter_overlong: bool = True,
        truncation: str = "error",
        skip_malformed: bool = False,
        apply_chat_template: bool = True,
        image_processor: Any = None,
        image_key: str = "images",
    ):
        """
        Args:
            path: a .parquet/.jsonl file or a list of them (concatenated in order).
            tokenizer: an HF tokenizer (encode, apply_chat_template, chat_template).
            max_prompt_length: prompt token limit; None = no limit.
            filter_overlong: drop (and count) longer prompts; if False, apply `truncation`:
                "error" (ValueError naming the row), "left" (keep the last tokens) or "right".
            skip_malformed: skip (and count) malformed rows instead of raising.
            apply_chat_template: use the tokenizer's chat template (when it has one); else plain text.
            image_processor: transformers' Qwen2-VL image processor; None = a text-only dataset.
            image_key: the column holding a row's images.
        """
        if truncation not in ("error", "left", "right"):
            raise ValueError(f"truncation must be 'error', 'left' or 'right', got {truncation!r}")
        self.tokenizer = tokenizer
        self.prompt_key, self.max_prompt_length = prompt_key, max_prompt_length
        self.filter_overlong, self.truncation = filter_overlong, truncation
        self.skip_malformed, self.apply_chat_template = skip_malformed, apply_chat_template
        self.image_processor, self.image_key = image_processor, image_key
        if image_processor is not None:
            self.image_pad_id = multimodal.image_pad_id(tokenizer)
        self.skipped = self.filtered = 0
        paths = [path] if isinstance(path, (str, Path)) else list(path)
        self.items: list[dict[str, Any]] = []
        for p in map(Path, paths):
            if not p.is_file():
                raise ValueError(f"dataset file {p} does not exist")
            for i, row in enumerate(read_rows(p)):
                item = self._build(p, i, row)
                if item is not None:
                    self.items.append(item)

    def _malformed(self, path: Path, i: int, reason: str) -> None:
        if not self.skip_malformed:
            raise ValueError(f"{path}: row {i}: {reason}")
        self.skipped += 1

    def _text(self, messages: list[dict[str, str]], raw_prompt: Any) -> tuple[str, bool]:
        """(prompt text, whether a chat template produced it)."""
        if self.apply_chat_template and getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), True
        if not self.apply_chat_template and isinstance(raw_prompt, str):
            return raw_prompt, False  # base-model prompt: the string as given
        return _plain_template(messages), False

    def _build(self, path: Path, i: int, row: Any) -> dict[str, Any] | None:
        """Validate and tokenize one row; None if it is skipped or filtered."""
        if isinstance(row, _BadRow) or not isinstance(row, dict):
            return self._malformed(path, i, row.reason if isinstance(row, _BadRow) else f"not an object: {row!r:.80}")
        if self.image_processor is None and row.get(self.image_key):  # a setup error, never a skip
            raise ValueError(f"{path}: row {i} has {self.image_key!r}: pass image_processor= to read images")
        try:
            messages = row_messages(row, self.prompt_key)
            reward_model = row.get("reward_model") or {}
            extra_info = row.get("extra_info") or {}
            if not isinstance(reward_model, dict) or not isinstance(extra_info, dict):
                raise ValueError("'reward_model' and 'extra_info' must be dicts")
            if row.get("data_source") is not None and not isinstance(row["data_source"], str):
                raise ValueError(f"'data_source' must be a string, got {row['data_source']!r:.80}")
            vision = self._vision(path, row, messages)
        except ValueError as e:
            return self._malformed(path, i, str(e))
        raw_prompt = row.get(self.prompt_key, row.get("messages"))
        text, templated = self._text(vision["template_messages"] if vision else messages, raw_prompt)
        ids = encode_text(self.tokenizer, text, templated=templated)
        if vision:
            try:  # raises if the text itself holds an <|image_pad|> token
                ids = multimodal.expand_image_pads(ids, vision["image_grid_thw"], self.image_pad_id,
                                                   self.image_processor.merge_size)
            except ValueError as e:
                return self._malformed(path, i, str(e))
        limit = self.max_prompt_length
        if limit is not None and len(ids) > limit:
            if self.filter_overlong:
                self.filtered += 1
                return None
            if self.truncation == "error" or (vision and vision["images"]):  # image pads must stay whole
                raise ValueError(f"{path}: row {i}: prompt has {len(ids)} tokens > max_prompt_length={limit}")
            ids = ids[-limit:] if self.truncation == "left" else ids[:limit]
        vision_fields = {"images": vision["images"], "image_grid_thw": vision["image_grid_thw"]} if vision else {}
        return dict(
            prompt_ids=ids,
            prompt_text=text,
            messages=messages,
            prompt=messages,
            data_source=row.get("data_source"),
            ground_truth=row.get("ground_truth", reward_model.get("ground_truth")),
            reward_model=reward_model,
            extra_info=extra_info,
            index=i,
            **vision_fields,
        )

    def _vision(self, path: Path, row: dict, messages: list[dict[str, str]]) -> dict[str, Any] | None:
        """Images of a row, decoded and processed (None for a text-only dataset): {"images": the entries
        with absolute paths, "image_grid_thw" [N_img, 3], "template_messages": markers replaced};
        ValueError (without location) for a malformed image or a marker/image count mismatch."""
        if self.image_processor is None:
            return None
        multimodal.check_image_column(row, self.image_key, messages)
        entries = row.get(self.image_key)
        images = multimodal.load_images(entries, path.parent)
        template_messages = multimodal.replace_image_markers(messages, len(images))
        _, image_grid_thw = multimodal.process_images(self.image_processor, images)
        return dict(images=[multimodal.resolve_image_entry(e, path.parent) for e in entries or []],
                    image_grid_thw=image_grid_thw, template_messages=template_messages)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict[str, Any]:
        """Item k; for a multimodal dataset with `pixel_values` [N_patches, C*T*P*P] computed now."""
        item = self.items[k]
        if self.image_processor is None:
            return item
        pixel_values, grid = multimodal.process_images(self.image_processor, multimodal.load_images(item["images"]))
        assert torch.equal(grid, item["image_grid_thw"]), "image processor output changed since construction"
        return {**item, "pixel_values": pixel_values}
