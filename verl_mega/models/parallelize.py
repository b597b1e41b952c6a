"""Layout -> pipeline stage: which layers this rank owns, whether it embeds / has the head, which TP group.

TorchTitan-style split: the model file knows nothing of pipelines; this module decides the stage.
Layers are split contiguously and balanced, earlier stages taking the extra layers (as Megatron's
uniform split does when the count divides, and a deterministic rule when it does not).
"""

from __future__ import annotations

import torch

from verl_mega.models.config import ModelConfig
from verl_mega.models.decoder import DecoderModel
from verl_mega.parallel.layout import Layout


def stage_layer_range(num_layers: int, pp: int, pp_rank: int) -> tuple[int, int]:
    """[start, end) global layer indices of pipeline stage `pp_rank` out of `pp`.

    Contiguous and balanced; the first `num_layers % pp` stages take one extra layer.
    Raises ValueError when there are fewer layers than stages.
    """
    if pp < 1 or not 0 <= pp_rank < pp:
        raise ValueError(f"pipeline rank {pp_rank} is not in [0, pp={pp})")
    if num_layers < pp:
        raise ValueError(f"num_layers={num_layers} is smaller than pipeline_parallel_size={pp}; "
                         f"every stage needs at least one layer")
    base, extra = divmod(num_layers, pp)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


def build_stage(config: ModelConfig, layout: Layout, *, value_head: bool = False, score_head: bool = False,
                params_dtype: torch.dtype = torch.float32, device=None, init_seed: int | None = 0) -> DecoderModel:
    """This rank's stage of the model under `layout` (its layers, embedding on the first stage, norm +
    LM head (or value / score head, see DecoderModel) on the last, TP over `layout.tp_group`).

    `init_seed` as in DecoderModel (None: leave uninitialised for loading). `device` None -> CPU.
    """
    config.check_tp(layout.tp)
    start, end = stage_layer_range(config.num_layers, layout.pp, layout.pp_rank)
    return DecoderModel(config, layout.tp_group, layer_range=(start, end), has_embedding=layout.is_first_stage,
                        has_head=layout.is_last_stage, value_head=value_head, score_head=score_head,
                        params_dtype=params_dtype, device=device, init_seed=init_seed)


RECOMPUTE_MODES = ("none", "selective", "full")


def apply_recompute(model: DecoderModel, mode: str, num_layers: int | None = None) -> None:
    """Activation recompute (torch.utils.checkpoint, non-reentrant) on this stage's layers.

    "selective": every layer keeps its inputs and projections but recomputes the attention core and the
    MLP activation silu(gate) * up in backward (Korthikanti et al. 2022, "Reducing Activation Recomputation",
    extended to the MLP activation). "full": the first `num_layers` layers of this stage (None: all) keep only
    their input and recompute the whole layer (Megatron's recompute_method=block); the others keep everything.
    "none": keep everything. Same numbers in every mode; only memory and backward time change.
    """
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute mode {mode!r} is not one of {RECOMPUTE_MODES}")
    if num_layers is not None and num_layers < 0:
        raise ValueError(f"recompute_layers must be >= 0 or None, got {num_layers}")
    full = len(model.layers) if num_layers is None else num_layers
    for i, layer in enumerate(model.layers):
        layer.recompute_full = mode == "full" and i < full
        layer.self_attn.recompute_core = layer.mlp.recompute_act = mode == "selective"


def apply_compile(model: DecoderModel, enabled: bool) -> None:
    """torch.compile (inductor, dynamic shapes) of each layer's forward where no KV cache is involved: the
    training, log-prob, reference and critic passes, whose backward is compiled with it. Two graphs per layer:
    before the attention core (norm, q/k/v projections, RoPE) and after it (output projection, residuals, norm,
    MLP); the core itself (SDPA or the packed-sequence kernel) runs eagerly between them, so the graphs see
    tensors only and a packed micro-batch's sequence count never reaches a guard. Inductor fuses the norms,
    RoPE, SwiGLU and residual adds (forward and backward) into a few kernels, the matmuls stay library calls;
    generation keeps its own path (fused ops, CUDA graphs). The layers share their compiled graphs (same code,
    weights as inputs): one per kind of pass (with / without autograd, recompute mode), compiled at its first
    call (seconds to a minute) with batch and sequence sizes symbolic from the start (the head sizes stay
    fixed). At tp > 1 megatron's asynchronous all-reduce in the linear layers' backward breaks the graph there
    (same numbers, fewer fusions).
    Not with sequence parallelism (ValueError: its layers run their collectives eagerly, so nothing would be
    compiled); call it after `apply_sequence_parallel`."""
    if enabled and model.sequence_parallel:
        raise ValueError("model.compile does not apply to sequence-parallel layers (parallel.sequence_parallel at "
                         "tp > 1): turn one of them off")
    for layer in model.layers:
        layer.compiled = (torch.compile(layer._pre_attention), torch.compile(layer._post_attention)) if enabled \
            else None


def apply_sequence_parallel(model: DecoderModel, enabled: bool) -> None:
    """Megatron sequence parallelism on this stage when tp > 1 (norms and residuals on 1/tp of the sequence,
    all-gather / reduce-scatter around each TP block: see parallel/sequence_parallel.py). Same numbers;
    activations between pipeline stages become sequence shards. A no-op at tp = 1."""
    model.sequence_parallel = bool(enabled) and model.tp > 1
