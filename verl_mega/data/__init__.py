"""Data: verl-format parquet/jsonl prompt datasets (text and images), resumable sharded batch loader, left padding."""

from verl_mega.data.dataset import RLDataset
from verl_mega.data.loader import PromptLoader, get_dataloader, left_pad
from verl_mega.data.multimodal import encode_vision_prompt, load_image_processor

__all__ = ["RLDataset", "PromptLoader", "get_dataloader", "left_pad", "encode_vision_prompt", "load_image_processor"]
