"""Images of multimodal prompts (Qwen2.5-VL style): decode, mark, run the image processor, expand image pads.

Reference: verl's `RLHFDataset` for multimodal rows (`verl/utils/dataset/rl_dataset.py`) and its geo3k
preprocessing (`examples/data_preprocess/geo3k.py`): the user content holds one `<image>` marker per
image, the `images` column a list of `{"bytes": <png/jpeg>}` or `{"path": ...}` entries (or path strings).
transformers' `Qwen2_5_VLProcessor` gives the rest:

    "<image>"           -> "<|vision_start|><|image_pad|><|vision_end|>" (before the chat template)
    images              -> image processor -> pixel_values [N_patches, C*T*P*P], image_grid_thw [N_img, 3]
    each <|image_pad|>  -> grid_t * grid_h * grid_w / merge_size**2 copies (one per merged patch = one
                           vision embedding the model writes there)

Pixels are resized and normalised by transformers' image processor only (`Qwen2VLImageProcessorPil`,
loaded with `load_image_processor`), never by hand. The pad expansion is done on token ids with the rule
of `Qwen2_5_VLProcessor.replace_image_token`, because transformers 5.25 builds that processor class only
when torchvision is installed (for its video processor), and verl_mega does not depend on torchvision.

Simplifications: images only (no video); relative image paths are resolved against the data file's folder.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from verl_mega.data.text import encode_text

IMAGE_MARKER = "<image>"
VISION_START, IMAGE_PAD, VISION_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
IMAGE_PLACEHOLDER = VISION_START + IMAGE_PAD + VISION_END


def load_image_processor(path: str | Path) -> Any:
    """transformers' Qwen2-VL image processor of a model/processor directory, PIL backend (no torchvision)."""
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(path), backend="pil")


def resolve_image_entry(entry: Any, base_dir: Path | None) -> Any:
    """`entry` with a relative path made absolute against `base_dir` (as {"path": ...}); other entries (data URIs
    and URLs included) as given."""
    file = entry.get("path") if isinstance(entry, dict) and entry.get("bytes") is None else entry
    if isinstance(file, str) and file and base_dir is not None and not file.startswith(("data:", "http://", "https://")):
        path = Path(file.removeprefix("file://"))
        return {"path": str(path if path.is_absolute() else base_dir / path)}
    return entry


def _data_uri_as_bytes(entry: Any) -> Any:
    """A "data:image/...;base64,..." string (or {"path": it} / {"image": it}) as {"bytes": decoded}, as
    qwen_vl_utils' fetch_image (verl's image reader) accepts it; other entries as given. ValueError for bad base64."""
    uri = entry.get("image", entry.get("path")) if isinstance(entry, dict) and entry.get("bytes") is None else entry
    if not (isinstance(uri, str) and uri.startswith("data:image") and "base64," in uri):
        return entry
    try:
        return {"bytes": base64.b64decode(uri.split("base64,", 1)[1], validate=True)}
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"image data URI {uri:.60}... is not valid base64 ({e})") from None


def load_image(entry: Any, base_dir: Path | None = None) -> Any:
    """One image of a row as an RGB `PIL.Image`, decoded in full.

    entry: {"bytes": png/jpeg bytes} (a "path" beside it is ignored, as HF datasets' Image feature writes
    both), {"path": file}, a path string (a "file://" prefix is dropped), a "data:image/...;base64,..." URI
    or a PIL image. Relative paths are taken from `base_dir`; URLs are refused (no downloads). ValueError
    (without the row's location) on a missing file, undecodable bytes, an image over PIL's decompression-bomb
    limit or a wrong type.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(entry, Image.Image):
        return entry.convert("RGB")
    entry = _data_uri_as_bytes(entry)
    entry = resolve_image_entry(entry, base_dir)
    if isinstance(entry, dict) and entry.get("bytes") is not None:
        data = entry["bytes"]
        if not isinstance(data, (bytes, bytearray)):
            raise ValueError(f"image 'bytes' must be bytes, got {type(data).__name__}")
        source, what = io.BytesIO(data), f"{len(data)} image bytes"
    else:
        file = entry.get("path") if isinstance(entry, dict) else entry
        if not isinstance(file, str) or not file:
            raise ValueError(f"an image must be {{'bytes': ...}}, {{'path': ...}} or a path string, got {entry!r:.80}")
        if file.startswith(("http://", "https://")):
            raise ValueError(f"image {file:.120} is a URL: images are not downloaded; store the bytes or a local path")
        source = Path(file.removeprefix("file://"))
        try:
            exists = source.is_file()
        except OSError as e:  # e.g. a name too long: a raw base64 string given as a path
            raise ValueError(f"image file {str(source):.120}... cannot be looked up ({e.strerror}); a base64 image "
                             f"needs the 'data:image/png;base64,' prefix") from None
        if not exists:
            raise ValueError(f"image file {str(source):.300} does not exist")
        what = f"image file {source}"
    try:
        with Image.open(source) as image:
            return image.convert("RGB")  # convert() loads all pixels: truncated data fails here, not later
    except UnidentifiedImageError:
        raise ValueError(f"{what} could not be decoded as an image (not a format PIL reads)") from None
    except Image.DecompressionBombError as e:  # PIL refuses > 2 x Image.MAX_IMAGE_PIXELS before decoding
        raise ValueError(f"{what} is too large to decode ({e}); downscale it (the image processor resizes every "
                         f"image to at most its max_pixels anyway)") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"{what} could not be decoded as an image ({e})") from None


def load_images(entries: Any, base_dir: Path | None = None) -> list[Any]:
    """All images of a row (`images` column: None or a list of entries, see `load_image`); ValueError
    naming the image's position in the list."""
    if entries is None:
        return []
    if not isinstance(entries, (list, tuple)):
        raise ValueError(f"'images' must be a list of images, got {type(entries).__name__}")
    images = []
    for k, entry in enumerate(entries):
        try:
            images.append(load_image(entry, base_dir))
        except ValueError as e:
            raise ValueError(f"image {k}: {e}") from None
    return images


def count_markers(messages: Sequence[dict[str, str]]) -> int:
    """Number of `<image>` markers in the messages' contents."""
    return sum(m["content"].count(IMAGE_MARKER) for m in messages)


def check_image_column(row: dict, image_key: str, messages: Sequence[dict[str, str]]) -> None:
    """ValueError when the prompt has `<image>` markers but the row has no `image_key` column at all (e.g. the
    images sit in an "image" column), naming the row's columns."""
    markers = count_markers(messages) if image_key not in row else 0
    if markers:
        raise ValueError(f"the prompt has {markers} {IMAGE_MARKER} markers but the row has no "
                         f"{image_key!r} column (columns: {sorted(row)})")


def replace_image_markers(messages: Sequence[dict[str, str]], num_images: int) -> list[dict[str, str]]:
    """Messages with each `<image>` marker replaced by the vision placeholder; ValueError if the number of
    markers differs from the number of images."""
    markers = count_markers(messages)
    if markers != num_images:
        raise ValueError(f"the prompt has {markers} {IMAGE_MARKER} markers but the row has {num_images} images")
    return [{**m, "content": m["content"].replace(IMAGE_MARKER, IMAGE_PLACEHOLDER)} for m in messages]


def image_pad_id(tokenizer: Any) -> int:
    """Token id of <|image_pad|>; ValueError if the tokenizer lacks one of the vision tokens."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (VISION_START, IMAGE_PAD, VISION_END)]
    unk = getattr(tokenizer, "unk_token_id", None)
    missing = [t for t, i in zip((VISION_START, IMAGE_PAD, VISION_END), ids) if i is None or i == unk]
    if missing:
        raise ValueError(f"the tokenizer has no vision token(s) {missing}: use a Qwen2-VL/Qwen2.5-VL tokenizer")
    return ids[1]


def process_images(image_processor: Any, images: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the image processor on a row's images.

    Returns: pixel_values [N_patches, C*T*P*P] float32 (all images' patches, concatenated in order),
        image_grid_thw [N_img, 3] long (patch grid (t, h, w) per image); for no image, shapes [0, C*T*P*P]
        and [0, 3].
    """
    if not images:
        patch_dim = 3 * image_processor.temporal_patch_size * image_processor.patch_size ** 2
        return torch.zeros(0, patch_dim), torch.zeros(0, 3, dtype=torch.long)
    out = image_processor(images=list(images), return_tensors="pt")
    return out["pixel_values"].float(), out["image_grid_thw"].long()


def expand_image_pads(ids: Sequence[int], image_grid_thw: torch.Tensor, pad_id: int, merge_size: int) -> list[int]:
    """Token ids with the k-th `pad_id` repeated grid_t*grid_h*grid_w / merge_size**2 times for image k
    (`image_grid_thw` [N_img, 3]); ValueError if the number of pads differs from the number of images."""
    counts = (image_grid_thw.prod(dim=-1) // merge_size ** 2).tolist()
    pads = sum(1 for t in ids if t == pad_id)
    if pads != len(counts):
        raise ValueError(f"the prompt has {pads} {IMAGE_PAD} tokens for {len(counts)} images")
    out: list[int] = []
    k = 0
    for t in ids:
        if t == pad_id:
            out.extend([pad_id] * counts[k])
            k += 1
        else:
            out.append(t)
    return out


def encode_vision_prompt(tokenizer: Any, image_processor: Any, messages: Sequence[dict[str, str]], images: Any, *,
                         base_dir: Path | None = None) -> dict[str, Any]:
    """A chat prompt with images outside a data file (e.g. `trainer.step([{"prompt": [...], "images": [...]}])`),
    encoded as `RLDataset` encodes a templated row: markers replaced, chat template with the generation
    prompt, image pads expanded.

    Returns: {"prompt_ids": list[int], "prompt_text": str, "pixel_values": [N_patches, C*T*P*P] float32,
        "image_grid_thw": [N_img, 3] long}.
    """
    decoded = load_images(images, base_dir)
    template_messages = replace_image_markers(messages, len(decoded))
    text = tokenizer.apply_chat_template(template_messages, add_generation_prompt=True, tokenize=False)
    pixel_values, image_grid_thw = process_images(image_processor, decoded)
    ids = expand_image_pads(encode_text(tokenizer, text, templated=True), image_grid_thw, image_pad_id(tokenizer),
                            image_processor.merge_size)
    return dict(prompt_ids=ids, prompt_text=text, pixel_values=pixel_values, image_grid_thw=image_grid_thw)
