"""HybridEngine: reshard actor weights from the training layout (tp, pp, dp) to the generation layout
(tp_g, pp_g=1) and back, with HybridFlow's zero-redundancy micro-DP grouping.

Reference: HybridFlow (Sheng et al., EuroSys 2025) §5 and Table 2; groups in `groups.py`.

`to_inference()`:
  1. pack this rank's training tensors into its chunk of one flat buffer (one `torch.cat`);
  2. ONE in-place all-gather of the chunks inside the micro-DP group (d_g = p·t/t_g ranks whose
     training shards tile this rank's generation shard): received (d_g-1)/(t·p)·M bytes, the
     paper's (t·p − t_g·p_g)/(t_g·p_g·t·p)·M;
  3. point the parameters of a persistent inference `DecoderModel` (all layers, embedding and head,
     on the generation TP group) at the result:
     - t_g = t (pp → 1 only): every parameter is ONE piece, so no copy at all — this rank's own
       stage reuses the training tensors in place, other stages are views of the gather buffer;
     - t_g < t: a parameter is the concatenation of r = t/t_g pieces along its partition dim, which
       rank-major chunks cannot provide as a view, so it is assembled with one `torch.cat` and the
       gather buffer is freed when done (transient peak: buffer + generation shard).
`to_train()` drops the inference storage (parameters become empty, the buffer is released); nothing
is copied back because generation never modifies weights.

`ReshardStats.redundant_bytes` is the weight memory held in inference mode beyond one generation
shard. Simplification versus the paper's 0: the training tensors are never moved or freed (they may
live in optimizer / DDP buffers), so the training shard (M/(t·p)) stays besides the generation shard
(with t_g = t it is the own chunk of the gather buffer). `NaiveGatherEngine` is the
DeepSpeed-Chat-style baseline: all-gather every rank's shard over the whole world and keep it.

Only pp_g = 1 is implemented (the groups support pp_g > 1). All parameters must share one dtype.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from verl_mega.hybrid_engine.comm import all_gather_flat, all_gather_rows
from verl_mega.hybrid_engine.groups import InferenceLayout, check_inference_sizes
from verl_mega.hybrid_engine.plan import ParamPlan, Piece, chunk_metas, partition_dim, plan_params
from verl_mega.models.config import ModelConfig
from verl_mega.models.decoder import DecoderModel
from verl_mega.parallel.layout import Layout


@dataclass
class ReshardStats:
    """What one `to_inference()` cost on this rank."""

    bytes_moved: int  # bytes received by this rank
    bytes_gathered: int  # size of the gather buffer (all members' chunks, padding included)
    redundant_bytes: int  # weight memory held in inference mode beyond one generation shard
    analytic_bytes: float  # the paper's (t·p − t_g·p_g)/(t_g·p_g·t·p)·M for this layout
    model_bytes: int  # M: the whole model (padded vocab of the generation layout)
    seconds: float  # wall time of to_inference (CUDA synchronised)
    num_collectives: int  # all-gathers issued


class HybridEngine:
    """Reshard `train_model` (this rank's stage under `train_layout`) to tensor-parallel size `tp_g`.

    Construction is collective over the world (creates the generation groups, exchanges chunk
    metadata once) and builds the inference model skeleton once; `to_inference()` /
    `to_train()` are collective over the gather group (micro-DP; world for the naive baseline).
    """

    copy_out = None  # None: copy out of the buffer only when parameters need concatenation

    def __init__(self, train_model: DecoderModel, train_layout: Layout, config: ModelConfig | None = None,
                 tp_g: int | None = None, *, pp_g: int = 1, timeout_s: float | None = None):
        config = config if config is not None else train_model.config
        tp_g = train_layout.tp if tp_g is None else tp_g
        check_inference_sizes(train_layout.tp, train_layout.pp, tp_g, pp_g)
        if pp_g != 1:
            raise ValueError(f"pp_g={pp_g}: only pp_g=1 (generation without pipeline) is implemented")
        config.check_tp(tp_g)
        dtypes = {p.dtype for p in train_model.parameters()}
        if len(dtypes) != 1:
            raise ValueError(f"HybridEngine needs all parameters in one dtype, got {sorted(map(str, dtypes))}")
        self.train_model, self.train_layout, self.config = train_model, train_layout, config
        self.dtype = dtypes.pop()
        self.device = next(train_model.parameters()).device
        self.inference_layout = InferenceLayout.create(train_layout, tp_g, pp_g, timeout_s=timeout_s)
        self.model = self._build_skeleton()
        self._shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters()}
        self.model_bytes = self._full_model_bytes()
        self._train_params = {train_model.hf_name(n): p for n, p in train_model.named_parameters()}
        self._sent = self._tensors_to_send()
        metas = chunk_metas(self._sent, train_layout.tp_rank, train_layout.tp)
        group = self._gather_group()
        all_metas: list = [None] * group.size()
        dist.all_gather_object(all_metas, metas, group=group)
        self._member = dist.get_rank(group)
        self._chunk = max(sum(m.numel for m in ms) for ms in all_metas)  # elements per chunk (padded)
        self._plans = plan_params(self.model, all_metas)
        self._release()  # the skeleton keeps no storage until to_inference()
        self._buffer: torch.Tensor | None = None
        self.active = False
        self.last_stats: ReshardStats | None = None

    # ------------------------------------------------------------------ set-up
    def _gather_group(self) -> dist.ProcessGroup:
        return self.inference_layout.micro_dp_group

    def _tensors_to_send(self) -> list[tuple[str, torch.Tensor]]:
        """TP shards needed by the inference model; replicated tensors only from the first of the
        r = t/t_g TP ranks of a stage inside the micro-DP group (so each is sent once)."""
        wanted = {self.model.hf_name(n) for n in self._shapes}
        r = self.train_layout.tp // self.inference_layout.tp_g
        first_of_block = self.train_layout.tp_rank % r == 0
        return [(hf, p) for hf, p in self._train_params.items()
                if hf in wanted and (partition_dim(p) is not None or first_of_block)]

    def _build_skeleton(self) -> DecoderModel:
        model = DecoderModel(self.config, self.inference_layout.tp_g_group, layer_range=(0, self.config.num_layers),
                             has_embedding=True, has_head=True, value_head=self.train_model.value_head is not None,
                             params_dtype=self.dtype, device=self.device, init_seed=None)
        return model.requires_grad_(False).eval()

    def _full_model_bytes(self) -> int:
        tp_g = self.inference_layout.tp_g
        numel = sum(p.numel() * (tp_g if partition_dim(p) is not None else 1) for p in self.model.parameters())
        return numel * self.dtype.itemsize

    def analytic_bytes(self) -> float:
        """The paper's per-rank transition volume (t·p − t_g·p_g)/(t_g·p_g·t·p)·M."""
        t, p = self.train_layout.tp, self.train_layout.pp
        t_g, p_g = self.inference_layout.tp_g, self.inference_layout.pp_g
        return (t * p - t_g * p_g) / (t_g * p_g * t * p) * self.model_bytes

    # ------------------------------------------------------------------ transitions
    @torch.no_grad()
    def to_inference(self) -> DecoderModel:
        """Gather this rank's generation shard; return the inference model (all layers, tp_g)."""
        if self.active:
            return self.model
        _sync(self.device)
        start = time.perf_counter()
        group = self._gather_group()
        size, chunk = group.size(), self._chunk
        buffer, collectives, moved = None, 0, 0
        if size > 1:
            buffer = torch.empty(size * chunk, dtype=self.dtype, device=self.device)
            own = buffer[self._member * chunk:(self._member + 1) * chunk]
            used = sum(p.numel() for _, p in self._sent)
            if used:
                torch.cat([p.detach().reshape(-1) for _, p in self._sent], out=own[:used])
            all_gather_flat(buffer, own, group)
            collectives, moved = 1, (size - 1) * chunk * self.dtype.itemsize
        views = False
        copy_out = self.copy_out if self.copy_out is not None else any(len(pl.pieces) > 1 for pl in self._plans)
        params = dict(self.model.named_parameters())
        for plan in self._plans:
            tensor, is_view, extra = self._assemble(plan, buffer, copy_out)
            params[plan.name].data = tensor
            views |= is_view
            collectives, moved = collectives + (extra > 0), moved + extra
        self._buffer = buffer if views else None
        self.active = True
        _sync(self.device)
        self.last_stats = ReshardStats(
            bytes_moved=moved, bytes_gathered=0 if buffer is None else buffer.numel() * self.dtype.itemsize,
            redundant_bytes=self._redundant_bytes(), analytic_bytes=self.analytic_bytes(),
            model_bytes=self.model_bytes, seconds=time.perf_counter() - start, num_collectives=collectives)
        return self.model

    def to_train(self) -> DecoderModel:
        """Release the inference weights and the gather buffer; return the (untouched) training model."""
        self._release()
        self._buffer = None
        self.active = False
        return self.train_model

    def _release(self) -> None:
        for param in self.model.parameters():
            param.data = torch.empty(0, dtype=self.dtype, device=self.device)

    def _piece(self, piece: Piece, buffer: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
        """(tensor, is_view_of_buffer) of one piece; this rank's own pieces are the training tensors."""
        meta = piece.meta
        if piece.member == self._member:
            return self._train_params[meta.hf_name].detach(), False
        start = piece.member * self._chunk + meta.offset
        return buffer[start:start + meta.numel].view(meta.shape), True

    def _assemble(self, plan: ParamPlan, buffer: torch.Tensor | None, copy_out: bool) -> tuple[torch.Tensor, bool, int]:
        """(tensor, is_view_of_buffer, extra bytes received) of one inference parameter."""
        parts = [self._piece(p, buffer) for p in plan.pieces]
        if len(parts) == 1:
            tensor, is_view = parts[0]
        else:
            tensor, is_view = torch.cat([t for t, _ in parts], dim=plan.cat_dim), False
        extra = 0
        if plan.realign:  # vocab padded differently for t and t_g: collect all rows, keep ours
            block = tensor
            tensor = all_gather_rows(block, self.inference_layout.tp_g_group)
            extra = (tensor.numel() - block.numel()) * tensor.element_size()
            tensor = tensor[plan.keep_rows[0]:plan.keep_rows[1]].clone()
        elif plan.keep_rows is not None:
            tensor = tensor[plan.keep_rows[0]:plan.keep_rows[1]]
        if copy_out and (is_view or len(parts) == 1):
            tensor, is_view = tensor.clone(), False
        assert tuple(tensor.shape) == plan.shape, f"{plan.name}: built {tuple(tensor.shape)}, expected {plan.shape}"
        return tensor, is_view, extra

    def _redundant_bytes(self) -> int:
        """Weight bytes held now (training tensors + gather buffer + new tensors) minus one generation shard."""
        seen, held = set(), 0
        tensors = [p for p in self.train_model.parameters()] + [p for p in self.model.parameters()]
        if self._buffer is not None:
            tensors.append(self._buffer)
        buffer_range = (0, 0) if self._buffer is None else (
            self._buffer.data_ptr(), self._buffer.data_ptr() + self._buffer.numel() * self._buffer.element_size())
        for t in tensors:
            ptr = t.data_ptr()
            if t is not self._buffer and buffer_range[0] <= ptr < buffer_range[1]:
                continue  # a view of the buffer, counted with it
            if ptr not in seen:
                seen.add(ptr)
                held += t.numel() * t.element_size()
        shard = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return held - shard


class NaiveGatherEngine(HybridEngine):
    """DeepSpeed-Chat-style baseline: every rank all-gathers every rank's whole training shard over the
    world (one all-gather of world·chunk) and keeps the gathered buffer during generation; the
    inference model is cut out of it (views where possible). Same interface and stats as HybridEngine."""

    copy_out = False

    def _gather_group(self) -> dist.ProcessGroup:
        return dist.group.WORLD

    def _tensors_to_send(self) -> list[tuple[str, torch.Tensor]]:
        return list(self._train_params.items())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stage_model(actor_or_model) -> DecoderModel:
    if isinstance(actor_or_model, DecoderModel):
        return actor_or_model
    for attr in ("model", "module", "stage"):
        candidate = getattr(actor_or_model, attr, None)
        if isinstance(candidate, DecoderModel):
            return candidate
    raise ValueError(f"expected a DecoderModel or an actor holding one in .model, got {type(actor_or_model).__name__}")


def get_engine(actor_or_model, layout: Layout, tp_g: int | None = None) -> HybridEngine:
    """The HybridEngine of this actor's stage for `tp_g` (default: the training tp), created on first use
    (collective: every rank must call it for the same tp_g in the same order) and cached on the model."""
    model = _stage_model(actor_or_model)
    tp_g = layout.tp if tp_g is None else tp_g
    cache = model.__dict__.setdefault("_hybrid_engines", {})
    if tp_g not in cache:
        cache[tp_g] = HybridEngine(model, layout, model.config, tp_g)
    return cache[tp_g]


def build_inference_model(actor_or_model, layout: Layout, tp_g: int | None = None) -> tuple[DecoderModel, InferenceLayout]:
    """Reshard an actor (or its DecoderModel stage) to generation TP size `tp_g` (default: training tp).

    Returns (inference model with all layers on the generation TP group, its InferenceLayout: split
    prompts over `dp_g_group`, gather responses back over it). Collective. Call
    `release_inference_model(actor_or_model, layout, tp_g)` (or use `inference_model(...)`) afterwards.
    """
    engine = get_engine(actor_or_model, layout, tp_g)
    return engine.to_inference(), engine.inference_layout


def release_inference_model(actor_or_model, layout: Layout, tp_g: int | None = None) -> None:
    """Drop the inference weights built by `build_inference_model` (back to the training layout)."""
    get_engine(actor_or_model, layout, tp_g).to_train()


@contextlib.contextmanager
def inference_model(actor_or_model, layout: Layout, tp_g: int | None = None):
    """`with inference_model(actor, layout, tp_g) as (model, inference_layout): ...` — released on exit."""
    try:
        yield build_inference_model(actor_or_model, layout, tp_g)
    finally:
        release_inference_model(actor_or_model, layout, tp_g)
