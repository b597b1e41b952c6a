"""Shared pieces of the engine / checkpoint tests: a tiny HF llama, a fixed global batch per step,
training a layout for a few steps, and gathering the full weights for comparison."""

from __future__ import annotations

import torch

from verl_mega.models.config import ModelConfig
from verl_mega.models.hf_io import full_tensor, load_hf_weights
from verl_mega.models.parallelize import build_stage
from verl_mega.parallel import Layout
from verl_mega.parallel.vocab_parallel import vocab_parallel_log_probs
from verl_mega.testing.tiny_hf import make_tiny_hf_model
from verl_mega.trainer.engine import TrainEngine, causal_lm_microbatches, next_token_loss
from verl_mega.trainer.optim import OptimConfig

GLOBAL_BATCH, SEQ, TOTAL_MICROBATCHES = 8, 12, 4
VOCAB = 120  # padded to 128: exercises the padded-column masking


def make_hf_dir(path: str, tie: bool = False) -> str:
    """Tiny llama; with `tie`, a tiny qwen2 (q/k/v biases: TP-sharded 1-D params) with tied embeddings."""
    return make_tiny_hf_model(path, "qwen2" if tie else "llama", vocab_size=VOCAB, tie=tie, hidden_size=32,
                              intermediate_size=64, num_layers=2, num_heads=4, seed=3 if tie else 0)


def optim_config() -> OptimConfig:
    return OptimConfig(lr=1e-3, warmup_steps=2, schedule="cosine", total_steps=6, min_lr=1e-4,
                       clip_grad=1.0, weight_decay=0.1)


def build_engine(layout: Layout, hf_dir: str, param_dtype=torch.float32) -> TrainEngine:
    model = build_stage(ModelConfig.from_hf(hf_dir), layout, init_seed=None)
    load_hf_weights(model, hf_dir)
    return TrainEngine(model, layout, optim_config(), param_dtype=param_dtype, bucket_mb=0.01)  # several buckets


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [8, 12] and a left-padding mask with different amounts of padding per row."""
    gen = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(6, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen)
    pad = torch.randint(0, SEQ // 2, (GLOBAL_BATCH,), generator=gen)
    mask = (torch.arange(SEQ)[None, :] >= pad[:, None]).long()
    return ids * mask, mask


def local_microbatches(layout: Layout, step: int) -> list[dict]:
    """This dp rank's share of the step's global batch, in TOTAL_MICROBATCHES / dp micro-batches."""
    ids, mask = global_batch(step)
    per = GLOBAL_BATCH // layout.dp
    rows = slice(layout.dp_rank * per, (layout.dp_rank + 1) * per)
    return causal_lm_microbatches(ids[rows], mask[rows], max(1, TOTAL_MICROBATCHES // layout.dp))


def train(engine: TrainEngine, steps, layout: Layout) -> list[tuple[float, float, float]]:
    """(loss, grad_norm, lr) of each step in `steps` (global batch chosen by step index)."""
    hist = []
    for step in steps:
        metrics = engine.forward_backward(local_microbatches(layout, step), next_token_loss(engine))
        stats = engine.optimizer_step()
        hist.append((metrics["loss"], stats["grad_norm"], stats["lr"]))
    return hist


def log_probs(engine: TrainEngine, layout: Layout, step: int) -> list[torch.Tensor]:
    """forward_only per-token log-probs [b, S] of this dp rank's micro-batches (available on every rank)."""
    model = engine.model

    def output_fn(hidden, mb):
        return {"logp": vocab_parallel_log_probs(hidden, model.output_weight(), mb["labels"], tp_group=layout.tp_group,
                                                 vocab_start=model.vocab_start_index,
                                                 true_vocab_size=model.true_vocab_size)}

    return [o["logp"] for o in engine.forward_only(local_microbatches(layout, step), output_fn)]


def full_weights(engine: TrainEngine, layout: Layout) -> dict[str, torch.Tensor]:
    """Unsharded weights of this stage keyed by HF name (vocab padding stripped), on tp rank 0 of dp
    replica 0; {} elsewhere. Collective over tp."""
    model, out = engine.model, {}
    for name, p in model.named_parameters():
        key = "model.embed_tokens.weight" if getattr(p, "shared_embedding", False) else model.hf_name(name)
        out[key] = full_tensor(model, name, p, layout).clone()
    return out if layout.tp_rank == 0 and layout.dp_rank == 0 else {}


def merge(per_rank: list[dict]) -> dict:
    merged = {}
    for d in per_rank:
        merged.update(d)
    return merged


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def history_diff(h1, h2) -> float:
    assert len(h1) == len(h2)
    return max(abs(x - y) / max(1.0, abs(y)) for r1, r2 in zip(h1, h2) for x, y in zip(r1, r2))
