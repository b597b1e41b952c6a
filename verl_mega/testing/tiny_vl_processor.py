"""Write a tiny Qwen2.5-VL processor (tokenizer + image processor + chat template) into a local directory.

Tests and the vision demo need the text and image side of a Qwen2.5-VL checkpoint without downloads.
`save_tiny_vl_processor(path)` writes, next to the config and weights that `make_tiny_qwen2_5_vl`
writes into the same directory:

- a character-level tokenizer (a `tokenizers` WordLevel model, one word per printable ASCII character,
  `Fuse` decoder; as `tiny_hf.make_tiny_tokenizer`) whose special tokens are Qwen2.5-VL's:
  <|endoftext|> (pad), <|im_start|>, <|im_end|> (eos), <|vision_start|>, <|vision_end|>, <|image_pad|>,
  <|video_pad|>; ids 0-6, then the characters (104 tokens in all);
- a ChatML chat template (string contents, or lists of {"type": "text"|"image"} parts as Qwen2.5-VL's);
- transformers' `Qwen2VLImageProcessorPil` (the PIL backend: no torchvision) with small min/max pixels,
  saved as `preprocessor_config.json` with `processor_class: Qwen2_5_VLProcessor`, and
  `processor_config.json` naming the same class, so `AutoProcessor.from_pretrained(path)` resolves to
  `Qwen2_5_VLProcessor`. (transformers 5.25 builds that class only with torchvision installed, for its
  video processor; verl_mega's data path therefore loads the two parts it uses, `AutoTokenizer` and
  `AutoImageProcessor`, see `verl_mega.data.multimodal`.)
"""

from __future__ import annotations

import json
import os
import string

VISION_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                         "<|image_pad|>", "<|video_pad|>"]
VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CHARS = [c for c in string.printable if c not in "\x0b\x0c\r"]  # letters, digits, punctuation, space, \t, \n


def make_tiny_vl_tokenizer():
    """The character-level `PreTrainedTokenizerFast` with Qwen2.5-VL's special tokens and chat template
    (pad <|endoftext|>, eos <|im_end|>, no bos; left padding)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(VISION_SPECIAL_TOKENS + _CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one word per character
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=VISION_SPECIAL_TOKENS, padding_side="left")
    fast.chat_template = VL_CHAT_TEMPLATE
    return fast


def save_tiny_vl_processor(path: str, *, vocab_size: int | None = None, min_pixels: int = 56 * 56,
                           max_pixels: int = 112 * 112, patch_size: int = 14, merge_size: int = 2,
                           temporal_patch_size: int = 2) -> dict[str, int | None]:
    """Write the tiny tokenizer and a `Qwen2VLImageProcessorPil` into `path` (created if missing).

    Args:
        vocab_size: the model's vocabulary size, checked to cover the tokenizer (None: the tokenizer's size).
        min_pixels, max_pixels: the image processor's resize bounds (pixels, after rounding each side to a
            multiple of patch_size * merge_size); 112 * 112 at patch 14 and merge 2 gives at most 64 patches,
            16 image tokens.
        patch_size, merge_size, temporal_patch_size: must equal the vision config's `patch_size`,
            `spatial_merge_size` and `temporal_patch_size`.

    Returns: the ids a Qwen2.5-VL config needs: vocab_size, image_token_id, video_token_id,
        vision_start_token_id, vision_end_token_id, eos_token_id, pad_token_id, bos_token_id (None).
    """
    from transformers import Qwen2VLImageProcessorPil

    tokenizer = make_tiny_vl_tokenizer()
    if vocab_size is not None and vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tiny VL tokenizer's {len(tokenizer)} tokens")
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, max_pixels={max_pixels}")
    os.makedirs(path, exist_ok=True)
    tokenizer.save_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size,
                                               merge_size=merge_size, temporal_patch_size=temporal_patch_size)
    image_processor.save_pretrained(path)
    _add_processor_class(os.path.join(path, "preprocessor_config.json"))
    with open(os.path.join(path, "processor_config.json"), "w", encoding="utf-8") as f:
        json.dump({"processor_class": "Qwen2_5_VLProcessor"}, f, indent=2)
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    return dict(vocab_size=vocab_size or len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **ids)


def _add_processor_class(config_file: str) -> None:
    """Name the processor class in the image processor's config, as Qwen2.5-VL checkpoints do."""
    with open(config_file, encoding="utf-8") as f:
        config = json.load(f)
    config["processor_class"] = "Qwen2_5_VLProcessor"
    with open(config_file, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
