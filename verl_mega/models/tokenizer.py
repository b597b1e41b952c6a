"""Tokenizer loading: a HF tokenizer directory, or a bare sentencepiece `.model` file.

`load_tokenizer(path)` returns
- a transformers tokenizer (`AutoTokenizer.from_pretrained(path, local_files_only=True)`) when the
  directory has `tokenizer.json` or `tokenizer_config.json` (chat template included); a tokenizer
  saved as the generic fast class is loaded with that class (transformers 5 would swap in the model type's class);
- a `SentencePieceTokenizer` when it only has a sentencepiece model (`tokenizer.model` or another
  `*.model`), or when `path` is such a file;
- None when there is no tokenizer.

`SentencePieceTokenizer` offers the small subset of the HF tokenizer API the repo uses: encode,
decode, `__call__` (ids + attention mask), eos/pad/bos token ids, `apply_chat_template` (a plain
ChatML rendering unless a Jinja template string is given) and `save_pretrained`. Like a HF
tokenizer, encode and `__call__` add the special tokens (BOS) unless add_special_tokens=False.

The one tokenisation of prompt text (BOS for plain text, none for a chat-template rendering) is
`verl_mega.data.text.encode_text`, used by the dataset, `encode_prompts` and the demo.
"""

from __future__ import annotations

import json
import os
import shutil

DEFAULT_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class SentencePieceTokenizer:
    """Minimal HF-like wrapper around `sentencepiece.SentencePieceProcessor`."""

    def __init__(self, model_file: str, chat_template: str | None = None):
        import sentencepiece as spm

        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.chat_template = chat_template
        self.padding_side = "left"

    @staticmethod
    def _id_or_none(i: int) -> int | None:
        return i if i >= 0 else None

    @property
    def eos_token_id(self) -> int | None:
        return self._id_or_none(self.sp.eos_id())

    @property
    def bos_token_id(self) -> int | None:
        return self._id_or_none(self.sp.bos_id())

    @property
    def pad_token_id(self) -> int | None:
        """The pad id, falling back to eos when the model defines none (common for sentencepiece models)."""
        pad = self._id_or_none(self.sp.pad_id())
        return pad if pad is not None else self.eos_token_id

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (bos prepended if add_special_tokens and the model has one, as HF tokenizers do)."""
        ids = self.sp.encode(text)
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            special = {self.eos_token_id, self.bos_token_id, self._id_or_none(self.sp.pad_id())}
            ids = [i for i in ids if i not in special]
        return self.sp.decode(ids)

    def batch_decode(self, batch, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def __call__(self, texts: str | list[str], add_special_tokens: bool = True) -> dict:
        """{"input_ids": ..., "attention_mask": ...} (unpadded lists), like a HF tokenizer without padding."""
        single = isinstance(texts, str)
        ids = [self.encode(t, add_special_tokens) for t in ([texts] if single else texts)]
        masks = [[1] * len(x) for x in ids]
        return {"input_ids": ids[0] if single else ids, "attention_mask": masks[0] if single else masks}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = True,
                            **kwargs):
        """Render `messages` with the Jinja chat template (ChatML by default); token ids if tokenize."""
        import jinja2

        template = jinja2.Environment().from_string(self.chat_template or DEFAULT_CHATML)
        text = template.render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text  # as HF: the template has them

    def save_pretrained(self, out_dir: str) -> None:
        """Copy the sentencepiece model to `out_dir/tokenizer.model`."""
        os.makedirs(out_dir, exist_ok=True)
        shutil.copyfile(self.model_file, os.path.join(out_dir, "tokenizer.model"))


_GENERIC_FAST = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _declared_class(path: str) -> str | None:
    """`tokenizer_class` of tokenizer_config.json, if any."""
    config = os.path.join(path, "tokenizer_config.json")
    if not os.path.exists(config):
        return None
    with open(config) as f:
        return json.load(f).get("tokenizer_class")


def _sentencepiece_file(path: str) -> str | None:
    if os.path.isfile(path):
        return path if path.endswith(".model") else None
    preferred = os.path.join(path, "tokenizer.model")
    if os.path.exists(preferred):
        return preferred
    models = sorted(f for f in os.listdir(path) if f.endswith(".model"))
    return os.path.join(path, models[0]) if models else None


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a local model directory (or a sentencepiece `.model` file); None if there is none."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer path {path} does not exist")
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if _declared_class(path) in _GENERIC_FAST and os.path.exists(os.path.join(path, "tokenizer.json")):
            # transformers 5 would swap in the model type's tokenizer class (e.g. Qwen2Tokenizer, which
            # rebuilds its own pre-tokenizer); a generic fast tokenizer must be used exactly as saved.
            return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    sp_file = _sentencepiece_file(path)
    return SentencePieceTokenizer(sp_file) if sp_file else None
