"""Helpers for tests: run a function on N gloo ranks, build tiny Hugging Face models locally."""

from verl_mega.testing.multiprocess import run_distributed

__all__ = ["run_distributed"]
