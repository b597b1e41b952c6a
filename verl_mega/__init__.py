"""verl_mega: Megatron-style RL post-training for LLMs."""

__version__ = "0.1.0"
