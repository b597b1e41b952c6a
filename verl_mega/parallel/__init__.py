"""Parallel layouts and primitives: process groups, pipeline schedule, data parallel, ZeRO-1."""

from verl_mega.parallel.dist import device, init_distributed
from verl_mega.parallel.layout import Layout, layout_group_ranks

__all__ = ["Layout", "layout_group_ranks", "init_distributed", "device"]
