"""The image side of a run's data: which image processor a model's prompt datasets are read with.

A vision-language model's directory holds its processor files (transformers' Qwen2-VL image processor);
its datasets (`data.RLDataset(image_processor=...)`) decode and process each row's images with it, so
a malformed image row fails when the dataset is built, naming the file and the row. A text model reads
its datasets without one.
"""

from __future__ import annotations

from typing import Any


def image_processor_for(model_path: str | None, config) -> Any:
    """The image processor of the model at `model_path` with `ModelConfig` `config`; None for a text model.
    ValueError when a VLM directory has no image processor files."""
    if not getattr(config, "is_vlm", False):
        return None
    if model_path is None:
        raise ValueError("a vision-language model without a directory has no image processor: build its dataset "
                         "with RLDataset(image_processor=...) yourself")
    from verl_mega.data.multimodal import load_image_processor

    try:
        return load_image_processor(model_path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"the vision-language model at {model_path} has no usable image processor "
                         f"(preprocessor_config.json): {exc}") from None
