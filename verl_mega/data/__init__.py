"""Data: verl-format parquet/jsonl prompt datasets, resumable sharded batch loader, left padding."""

from verl_mega.data.dataset import RLDataset
from verl_mega.data.loader import PromptLoader, get_dataloader, left_pad

__all__ = ["RLDataset", "PromptLoader", "get_dataloader", "left_pad"]
