"""Shared pieces of the engine / checkpoint tests: a tiny HF llama, a fixed global batch per step,
training a layout for a few steps, gathering the full weights and gradients, and the derived bound on
how far two runs' weights may drift apart given how far their gradients did (`adamw_weight_bound`)."""

from __future__ import annotations

import math

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


def train(engine: TrainEngine, steps, layout: Layout, trace: list | None = None) -> list[tuple[float, float, float]]:
    """(loss, grad_norm, lr) of each step in `steps` (global batch chosen by step index).

    With `trace` (a list), appends per step {"grads": the full pre-clipping gradients by HF name (see
    `full_grads`), "sqrt_v_hat": AdamW's bias-corrected sqrt(v) after the step, where this rank owns the
    parameter}; both are {} on ranks other than tp rank 0 of dp replica 0."""
    hist = []
    for step in steps:
        metrics = engine.forward_backward(local_microbatches(layout, step), next_token_loss(engine))
        grads = full_grads(engine, layout) if trace is not None else None
        stats = engine.optimizer_step()
        hist.append((metrics["loss"], stats["grad_norm"], stats["lr"]))
        if trace is not None:
            trace.append({"grads": grads, "sqrt_v_hat": _sqrt_v_hat(engine, layout)})
    return hist


def _hf_key(model, name: str, p: torch.Tensor) -> str:
    return "model.embed_tokens.weight" if getattr(p, "shared_embedding", False) else model.hf_name(name)


def full_grads(engine: TrainEngine, layout: Layout) -> dict[str, torch.Tensor]:
    """Unsharded dp-summed gradients (`main_grad`, before clipping) by HF name, like `full_weights`."""
    model, out = engine.model, {}
    for name, p in model.named_parameters():
        grad = p.main_grad.view_as(p)
        for attr in ("tensor_model_parallel", "partition_dim"):  # full_tensor reads the sharding from these
            if hasattr(p, attr):
                setattr(grad, attr, getattr(p, attr))
        out[_hf_key(model, name, p)] = full_tensor(model, name, grad, layout).clone()
    return out if layout.tp_rank == 0 and layout.dp_rank == 0 else {}


def _sqrt_v_hat(engine: TrainEngine, layout: Layout) -> dict[str, torch.Tensor]:
    """sqrt(exp_avg_sq / (1 - beta2^t)) of the parameters this rank owns (the reference run owns all)."""
    model, beta2, out = engine.model, engine.optim_config.betas[1], {}
    for name, p in model.named_parameters():
        if engine.zero.owns(p) and layout.tp == 1:
            v = engine.zero.adam_state(p)["exp_avg_sq"].view_as(p)
            v_hat = full_tensor(model, name, v, layout) / (1 - beta2 ** engine.adam_steps)
            out[_hf_key(model, name, p)] = v_hat.sqrt()
    return out


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
        out[_hf_key(model, name, p)] = full_tensor(model, name, p, layout).clone()
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


# ---------------------------------------------------------------- derived tolerances
FP32_U = 2.0 ** -24  # unit roundoff of fp32: one rounding moves x by at most FP32_U * |x|
# Gradients of two layouts differ only in the order of fp32 sums (tp: split matmul partial sums, dp:
# split token sums, pp: none). A length-n sum reordered moves by ~sqrt(n) * FP32_U * (scale of the terms)
# for rounding errors of random sign; the longest sums here have n <= 8 rows * 12 tokens * 64 = 6144
# terms, so ~80 * 6e-8 = 5e-6 of the gradient's scale (max |g|). Measured: <= 8e-7 of max |g| for every
# 2- and 4-rank layout. A real layout bug (a shard or partial sum lost or counted twice) moves whole
# gradient entries, i.e. O(1) of max |g|.
GRAD_RTOL = 1e-5
# Loss, grad norm and lr: sums of positive-ish terms over all tokens / elements (n <= 3e4), same
# argument: sqrt(3e4) * 6e-8 = 1e-5 relative. A weight that drifts further (see `adamw_weight_bound`)
# does so only where its gradient is ~0, so it moves the loss by ~|g| * lr, far below this.
HIST_RTOL = 1e-5


def clip_coef(grad_norm: float, clip_grad: float) -> float:
    """The factor `clip_grads_` scaled the gradients by: min(1, clip / (norm + 1e-6)); 1 without clipping."""
    return min(1.0, clip_grad / (grad_norm + 1e-6)) if clip_grad > 0 else 1.0


def adam_ratio_bound(betas: tuple[float, float], t: int) -> float:
    """rho_t, the largest |m_hat / sqrt(v_hat)| AdamW can reach at step t (1-based).

    m_hat = sum_s a_s g_s and v_hat = sum_s b_s g_s^2 with the bias-corrected EMA weights
    a_s = (1-b1) b1^(t-s) / (1-b1^t), b_s = (1-b2) b2^(t-s) / (1-b2^t); Cauchy-Schwarz gives
    |m_hat| <= sqrt(sum_s a_s^2 / b_s) * sqrt(v_hat). (1 at t = 1; 1.003 at t = 3 for (0.9, 0.999).)"""
    b1, b2 = betas
    a = [(1 - b1) * b1 ** (t - s) / (1 - b1 ** t) for s in range(1, t + 1)]
    b = [(1 - b2) * b2 ** (t - s) / (1 - b2 ** t) for s in range(1, t + 1)]
    return math.sqrt(sum(x * x / y for x, y in zip(a, b)))


def adamw_weight_bound(ref_trace: list[dict], ref_hist: list, run_grads: list[dict], run_hist: list,
                       ref_weights: dict[str, torch.Tensor], config: OptimConfig) -> dict[str, torch.Tensor]:
    """Per-element bound on |w_run - w_ref| after the traced AdamW steps, given both runs' gradients.

    ref_trace: the reference's `train(..., trace=)` records; run_grads: the other run's gradients per
    step (its trace's "grads"); *_hist: the (loss, grad_norm, lr) histories; ref_weights: the
    reference's final weights. Both runs start from the same weights.

    Argument, per element and step t (lr_t, rho_t = adam_ratio_bound, eps = config.eps):
    - the clipped gradients c*g differ by d_t (computed exactly from both runs, + 2 roundings);
      m_hat and sqrt(v_hat) are weighted means / weighted L2 norms of the history with weights summing
      to 1, so both move by at most D_t = max_{s<=t} d_s (triangle inequality);
    - the AdamW direction r = m_hat / (sqrt(v_hat) + eps) then moves by at most
      D_t (1 + rho_t) / (max(sqrt(v_hat_ref) - D_t, 0) + eps), and never by more than 2 rho_t, as |r| <= rho_t;
      the second case is an element whose gradient is ~0 (noise-level): it may move by up to lr in either
      direction, whatever the layout, which is why no single absolute tolerance fits every element;
    - w <- (1 - lr*wd) w - lr r keeps earlier differences (factor <= 1) and adds lr_t |dr|, plus each run's
      fp32 rounding of the update: 2 roundings of w and 3 of the update, 4u|w| + 6u lr rho for the pair,
      with |w| at any step <= |w_final| + sum_t lr_t (rho_t + 1) (an update moves w by lr (|r| + wd |w|)).
    """
    eps, clip = config.eps, config.clip_grad
    drift = sum(ref_hist[t][2] * (adam_ratio_bound(config.betas, t + 1) + 1) for t in range(len(ref_trace)))
    bound, worst = {}, {}
    for t, (ref_step, run_g) in enumerate(zip(ref_trace, run_grads)):
        lr, rho = ref_hist[t][2], adam_ratio_bound(config.betas, t + 1)
        c_ref, c_run = clip_coef(ref_hist[t][1], clip), clip_coef(run_hist[t][1], clip)
        for key, g in ref_step["grads"].items():
            d = (c_ref * g - c_run * run_g[key]).abs() + 2 * FP32_U * (c_ref * g).abs()
            worst[key] = d if t == 0 else torch.maximum(worst[key], d)
            big_d = worst[key]
            sqrt_v = ref_step["sqrt_v_hat"][key]
            dr = torch.minimum(big_d * (1 + rho) / ((sqrt_v - big_d).clamp(min=0) + eps),
                               torch.full_like(big_d, 2 * rho))
            rounding = 4 * FP32_U * (ref_weights[key].abs() + drift) + 6 * FP32_U * lr * rho
            bound[key] = bound.get(key, 0) + lr * dr + rounding
    return bound


def assert_weights_within(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                          bound: dict[str, torch.Tensor], ref_hist: list) -> None:
    """Every element of `got` within its `bound` of `want` (same keys), and the bound itself tight: below
    1% of the summed learning rates (what one AdamW update of every step moves an element by) for >= 99%
    of the elements, so a wrong update of any parameter (state lost, wrong shard) cannot pass."""
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    every = torch.cat([b.flatten() for b in bound.values()])
    tight = (every < 0.01 * sum(lr for _, _, lr in ref_hist)).float().mean().item()
    assert tight >= 0.99, f"the derived weight bound is loose for {1 - tight:.1%} of the elements"
    for key in want:
        excess = ((got[key] - want[key]).abs() - bound[key]).max().item()
        assert excess <= 0, f"{key}: exceeds its derived bound by {excess:.3e}"


def assert_grads_close(got: list[dict], want: list[dict]) -> None:
    """Per step, the full gradients within GRAD_RTOL * max |g| of the reference."""
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys()
        scale = max(v.abs().max().item() for v in w.values())
        diff = max((g[k] - w[k]).abs().max().item() for k in w)
        assert diff <= GRAD_RTOL * scale, f"step {step}: gradients differ by {diff:.3e} (max |g| {scale:.3e})"
