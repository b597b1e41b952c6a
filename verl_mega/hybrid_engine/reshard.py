"""HybridEngine: reshard actor weights from the training layout (tp, pp, dp) to the generation layout
(tp_g, pp_g=1) and back, with HybridFlow's zero-redundancy micro-DP grouping.

Reference: HybridFlow (Sheng et al., EuroSys 2025) §5 and Table 2; groups in `groups.py`, chunk
layout and assembly plan in `plan.py`.

`to_inference()`, packed path (pp > 1 inside the micro-DP group, or t_g = t):
  1. pack this rank's training tensors into its chunk of a flat buffer (one `torch.cat`);
  2. in-place all-gather of the chunks inside the micro-DP group (d_g = p·t/t_g ranks whose training
     shards tile this rank's generation shard): (d_g-1)/(t·p)·M bytes received, the paper's
     (t·p − t_g·p_g)/(t_g·p_g·t·p)·M. The chunk is cut into buckets (`bucket_mb`, default 256 MiB)
     and bucket k+1 is gathered (async) while bucket k is assembled, hiding the copies behind the
     communication; `bucket_mb=None` is the paper's single all-gather;
  3. point the parameters of a persistent inference `DecoderModel` (all layers, embedding and head,
     on the generation TP group) at the result:
     - t_g = t (pp → 1 only): every parameter is ONE piece, so nothing is copied: this rank's own
       stage reuses the training tensors in place, other stages are views of the gather buffers;
     - t_g < t: a parameter is the concatenation of r = t/t_g pieces along its partition dim, which
       member-major chunks cannot provide as a view: the generation shard gets one flat allocation
       and is filled by one `split_with_sizes_copy` per run of dim-0 tensors and one copy per dim-1
       tensor; each bucket buffer is freed once assembled.
Direct path (pp = 1 and t_g < t; the default there on CUDA/NCCL, `direct=True` elsewhere — on gloo
the per-tensor gathers are slower than packing): the micro-DP group is the r = t/t_g
consecutive training TP ranks of one stage, all holding shards of the same tensors, so each TP
parameter is gathered on its own, rank-major, straight from the training shards (no pack):
  - dim-0 split (q/k/v/gate/up and their biases, vocab rows of embedding and head): the gather
    output IS the inference parameter (its slot of one flat generation shard): no copy at all;
  - dim-1 split (o_proj, down_proj): gathered into a temporary [r, out, in/r], then one strided copy
    into [out, in]; vocab rows padded differently for t and t_g: trimmed / realigned as above;
  - replicated tensors (norms, row-layer biases): the inference parameter is the rank's own training
    tensor (no copy, no gather);
  the per-tensor gathers of a bucket go out as ONE grouped launch (`comm.gather_into`: NCCL
  `allgather_into_tensor_coalesced`; per-tensor list all-gathers on gloo); bucket k+1 is in flight
  while bucket k's dim-1 copies run (those are scheduled first, so the last buckets need no copy).
`to_train()` drops the inference storage (parameters become empty, buffers are released); nothing
is copied back because generation never modifies weights.

`ReshardStats.redundant_bytes` is the weight memory held in inference mode beyond one generation
shard. Simplification versus the paper's 0: the training tensors are never moved or freed (they may
live in optimizer / DDP buffers), so the training shard (M/(t·p)) stays besides the generation shard
(with t_g = t it is the own chunks of the gather buffers; on the direct path the replicated
tensors are shared, not counted twice). `NaiveGatherEngine` is the
DeepSpeed-Chat-style baseline: all-gather every rank's whole shard over the world and keep it all.

Only pp_g = 1 is implemented (the groups support pp_g > 1). All parameters must share one dtype.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from verl_mega.hybrid_engine.comm import Works, all_gather_flat, all_gather_rows, gather_into
from verl_mega.hybrid_engine.groups import InferenceLayout, check_inference_sizes
from verl_mega.hybrid_engine.plan import (DirectGather, ParamPlan, Piece, Run, bucketize, chunk_metas, direct_gathers,
                                          fused_runs, partition_dim, plan_params, send_order)
from verl_mega.models.config import ModelConfig
from verl_mega.models.decoder import DecoderModel
from verl_mega.parallel.layout import Layout

DEFAULT_BUCKET_MB = 256.0


@dataclass
class ReshardStats:
    """What one `to_inference()` cost on this rank."""

    bytes_moved: int  # bytes received by this rank
    bytes_gathered: int  # size of the gather buffers (all members' segments, padding included)
    redundant_bytes: int  # weight memory held in inference mode beyond one generation shard
    analytic_bytes: float  # the paper's (t·p − t_g·p_g)/(t_g·p_g·t·p)·M for this layout
    model_bytes: int  # M: the whole model (padded vocab of the generation layout)
    seconds: float  # wall time of to_inference (CUDA synchronised)
    num_collectives: int  # launches: bucket all-gathers (packed) or grouped per-tensor gathers (direct), + realigns
    tensors_gathered: int = 0  # direct path: per-tensor all-gathers inside those groups (0 when packed)


class HybridEngine:
    """Reshard `train_model` (this rank's stage under `train_layout`) to tensor-parallel size `tp_g`.

    Construction is collective over the world (creates the generation groups, exchanges chunk
    metadata once) and builds the inference model skeleton once (its storage is released until
    `to_inference()`); `to_inference()` / `to_train()` are collective over the gather group
    (micro-DP; the world for the naive baseline). `tp_g` defaults to the training tp (pure pp → 1).
    `inference_layout`: reuse the generation groups of another engine with the same layouts.
    `direct`: per-tensor gathers without packing (module docstring); None uses them on CUDA where
    they apply (pp = 1 and tp_g < tp), True wherever they apply (ValueError elsewhere), False never.
    """

    keep_buffers = False  # naive baseline: keep every gathered buffer during generation
    direct_capable = True  # naive baseline: its world group mixes stages and replicas, always packed
    coalesced: bool | None = None  # direct path: grouped launch (None: on NCCL only; see comm.gather_into)

    def __init__(self, train_model: DecoderModel, train_layout: Layout, config: ModelConfig | None = None,
                 tp_g: int | None = None, *, pp_g: int = 1, bucket_mb: float | None = DEFAULT_BUCKET_MB,
                 inference_layout: InferenceLayout | None = None, timeout_s: float | None = None,
                 direct: bool | None = None):
        config = config if config is not None else train_model.config
        tp_g = train_layout.tp if tp_g is None else tp_g
        check_inference_sizes(train_layout.tp, train_layout.pp, tp_g, pp_g)
        if pp_g != 1:
            raise ValueError(f"pp_g={pp_g}: only pp_g=1 (generation without pipeline) is implemented")
        if bucket_mb is not None and not bucket_mb > 0:
            raise ValueError(f"bucket_mb must be positive or None, got {bucket_mb!r}")
        config.check_tp(tp_g)
        dtypes = {p.dtype for p in train_model.parameters()}
        if len(dtypes) != 1:
            raise ValueError(f"HybridEngine needs all parameters in one dtype, got {sorted(map(str, dtypes))}")
        self.train_model, self.train_layout, self.config = train_model, train_layout, config
        self.dtype = dtypes.pop()
        self.device = next(train_model.parameters()).device
        if inference_layout is None:
            inference_layout = InferenceLayout.create(train_layout, tp_g, pp_g, timeout_s=timeout_s)
        elif (inference_layout.train is not train_layout or inference_layout.tp_g != tp_g
              or inference_layout.pp_g != pp_g):
            raise ValueError(f"inference_layout {inference_layout} was not built from this training layout "
                             f"for tp_g={tp_g}, pp_g={pp_g}")
        self.inference_layout = inference_layout
        self.model = self._build_skeleton()
        self._params = dict(self.model.named_parameters())
        self.model_bytes = self._full_model_bytes()
        self._train_params = {train_model.hf_name(n): p for n, p in train_model.named_parameters()}
        self._plan(bucket_mb, direct)
        self._release()  # the skeleton keeps no storage until to_inference()
        self._kept: list[torch.Tensor] = []
        self.active = False
        self.last_stats: ReshardStats | None = None

    # ------------------------------------------------------------------ set-up
    def _gather_group(self) -> dist.ProcessGroup:
        return self.inference_layout.micro_dp_group

    def _tensors_to_send(self) -> list[tuple[str, torch.Tensor]]:
        """TP shards needed by the inference model; replicated tensors only from the first of the
        r = t/t_g TP ranks of a stage inside the micro-DP group (so each is sent once)."""
        wanted = {self.model.hf_name(n) for n in self._params}
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

    def _plan(self, bucket_mb: float | None, direct: bool | None) -> None:
        """Exchange chunk metadata over the gather group (collective) and schedule the assembly."""
        sent = send_order(self._tensors_to_send())
        metas = chunk_metas(sent, self.train_layout.tp_rank, self.train_layout.tp)
        group = self._gather_group()
        all_metas: list = [None] * group.size()
        dist.all_gather_object(all_metas, metas, group=group)
        self._member = dist.get_rank(group)
        bucket_elems = None if bucket_mb is None else max(1, int(bucket_mb * 2**20) // self.dtype.itemsize)
        member_pieces, self._sizes = bucketize(all_metas, bucket_elems)
        num_buckets = len(self._sizes)
        mine = member_pieces[self._member]
        self._pack = [[p for (_, p), piece in zip(sent, mine) if piece.bucket == k] for k in range(num_buckets)]
        plans = plan_params(self.model, member_pieces)
        self._direct = self._use_direct(direct, plans)
        if self._direct:
            self._copy_mode = True
            self._gathers, self._reused, self._flat_numel = direct_gathers(plans, group.size(), bucket_elems)
        else:
            self._schedule(plans, num_buckets)

    def _use_direct(self, direct: bool | None, plans: list[ParamPlan]) -> bool:
        """Whether to take the direct path: it applies with one training stage in the micro-DP group
        and t_g < t; by default only on CUDA (NCCL's grouped launch; gloo is faster packed)."""
        if direct is not None and not isinstance(direct, bool):
            raise ValueError(f"direct must be True, False or None, got {direct!r}")
        possible = (self.direct_capable and self.train_layout.pp == 1 and self._gather_group().size() > 1
                    and any(len(plan.pieces) > 1 for plan in plans))
        if direct and not possible:
            raise ValueError(f"direct=True needs pp=1 and tp_g < tp (got pp={self.train_layout.pp}, "
                             f"tp={self.train_layout.tp}, tp_g={self.inference_layout.tp_g}), not the naive baseline")
        return possible and self.device.type == "cuda" if direct is None else direct

    def _schedule(self, plans: list[ParamPlan], num_buckets: int) -> None:
        """Decide when each parameter is built: before any gather (own pieces only), right after the
        last bucket it reads from, or after all buckets (vocab realign); and when each buffer is dropped."""
        self._copy_mode = any(len(plan.pieces) > 1 for plan in plans)
        runs, rest = fused_runs(plans) if self._copy_mode else ([], plans)
        self._runs_at: list[list[Run]] = [[] for _ in range(num_buckets)]
        self._plans_at: list[list[ParamPlan]] = [[] for _ in range(num_buckets)]
        self._early, self._late = [], []  # plans needing no gathered data / a realign after all buckets
        last_use = list(range(num_buckets))
        for run in runs:
            self._runs_at[run.bucket].append(run)
        for plan in rest:
            buckets = [p.bucket for p in plan.pieces if not self._is_own(p)]
            ready = num_buckets if plan.realign else max(buckets, default=-1)
            (self._early if ready < 0 else self._late if ready == num_buckets else self._plans_at[ready]).append(plan)
            for b in buckets:
                last_use[b] = max(last_use[b], ready)
        self._free_after = [[b for b in range(num_buckets) if last_use[b] == k] for k in range(num_buckets + 1)]
        self._slots, offset = [], 0  # copy mode: each parameter's place in one flat generation shard
        for param in self._params.values():
            self._slots.append((param, offset, param.numel(), tuple(param.shape)))
            offset += param.numel()
        self._flat_numel = offset

    @property
    def gather_group(self) -> dist.ProcessGroup:
        """The group of the resharding all-gathers (micro-DP; the world for the naive baseline)."""
        return self._gather_group()

    @property
    def chunk_numel(self) -> int:
        """Elements each rank contributes per to_inference() (packed: all buckets, padded to the largest
        member; direct: its TP shards)."""
        if self._direct:
            return sum(g.shard_numel for bucket in self._gathers for g in bucket)
        return sum(self._sizes)

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
        if self._direct:
            return self._to_inference_direct()
        _sync(self.device)
        start = time.perf_counter()
        flat = None
        if self._copy_mode:
            flat = torch.empty(self._flat_numel, dtype=self.dtype, device=self.device)
            for param, offset, numel, shape in self._slots:
                param.data = flat[offset:offset + numel].view(shape)
        gather = self._gather_group().size() > 1
        num_buckets = len(self._sizes) if gather else 0
        buffers: list[torch.Tensor | None] = [None] * num_buckets
        works: list = [None] * num_buckets
        realigned = 0
        for plan in self._early:
            self._build(plan, buffers)
        if num_buckets:
            buffers[0], works[0] = self._launch(0)
        for k in range(num_buckets):
            if k + 1 < num_buckets:  # gather the next bucket while this one is assembled
                buffers[k + 1], works[k + 1] = self._launch(k + 1)
            if works[k] is not None:
                works[k].wait()
            for run in self._runs_at[k]:
                self._copy_run(run, buffers)
            for plan in self._plans_at[k]:
                self._build(plan, buffers)
            self._drop(buffers, self._free_after[k])
        for plan in self._late:
            realigned += self._build(plan, buffers)
        self._drop(buffers, self._free_after[num_buckets] if num_buckets else [])
        self.active = True
        _sync(self.device)
        seconds = time.perf_counter() - start
        segment_bytes = sum(self._sizes) * self.dtype.itemsize if gather else 0
        size = self._gather_group().size()
        self.last_stats = ReshardStats(
            bytes_moved=(size - 1) * segment_bytes + realigned, bytes_gathered=size * segment_bytes,
            redundant_bytes=self._redundant_bytes(flat, size * segment_bytes), analytic_bytes=self.analytic_bytes(),
            model_bytes=self.model_bytes, seconds=seconds, num_collectives=num_buckets + len(self._late))
        return self.model

    @torch.no_grad()
    def _to_inference_direct(self) -> DecoderModel:
        """Direct path: grouped per-tensor gathers into the parameters (module docstring)."""
        _sync(self.device)
        start = time.perf_counter()
        flat = torch.empty(self._flat_numel, dtype=self.dtype, device=self.device)
        for plan in self._reused:
            self._params[plan.name].data = self._own(plan.pieces[0].meta.hf_name)
        num_buckets = len(self._gathers)
        pending: list = [None] * num_buckets  # (temporaries to assemble, work) of each launched bucket
        late = []  # vocab realigns: a collective over the generation TP group, after every gather
        pending[0] = self._launch_direct(0, flat)
        for k in range(num_buckets):
            if k + 1 < num_buckets:  # gather the next bucket while this one is re-assembled
                pending[k + 1] = self._launch_direct(k + 1, flat)
            temps, work = pending[k]
            work.wait()
            for gather, block in temps:
                if gather.plan.realign:
                    late.append((gather, block))
                else:
                    self._assemble(gather, block)
            pending[k] = None
        realigned = sum(self._assemble(gather, block) for gather, block in late)
        self.active = True
        _sync(self.device)
        seconds = time.perf_counter() - start
        size = self._gather_group().size()
        shard_bytes = self.chunk_numel * self.dtype.itemsize
        self.last_stats = ReshardStats(
            bytes_moved=(size - 1) * shard_bytes + realigned, bytes_gathered=size * shard_bytes,
            redundant_bytes=self._redundant_bytes(flat, 0), analytic_bytes=self.analytic_bytes(),
            model_bytes=self.model_bytes, seconds=seconds, num_collectives=num_buckets + len(late),
            tensors_gathered=sum(len(bucket) for bucket in self._gathers))
        return self.model

    def _own(self, hf_name: str) -> torch.Tensor:
        return self._train_params[hf_name].detach()

    def _launch_direct(self, k: int, flat: torch.Tensor) -> tuple[list[tuple[DirectGather, torch.Tensor]], Works]:
        """Point bucket k's parameters at their flat slots and start its gathers: dim-0 ones straight
        into the parameter, the others into one temporary buffer (returned as per-gather blocks)."""
        group = self._gather_group()
        size = group.size()
        gathers = self._gathers[k]
        temp_numel = sum(size * g.shard_numel for g in gathers if not g.into_param)
        buffer = torch.empty(temp_numel, dtype=self.dtype, device=self.device) if temp_numel else None
        outputs, inputs, temps, offset = [], [], [], 0
        for g in gathers:
            param = self._params[g.plan.name]
            param.data = flat[g.slot:g.slot + math.prod(g.plan.shape)].view(g.plan.shape)
            if g.into_param:
                assert param.numel() == size * g.shard_numel, g.plan.name
                out = param.data
            else:
                out = buffer[offset:offset + size * g.shard_numel].view(size, *g.shard_shape)  # [member, *shard]
                offset += out.numel()
                temps.append((g, out))
            outputs.append(out)
            inputs.append(self._own(g.hf_name))
        return temps, gather_into(outputs, inputs, group, coalesced=self.coalesced)

    def _assemble(self, gather: DirectGather, block: torch.Tensor) -> int:
        """Fill a parameter from its gathered [member, *shard] block; returns extra bytes received."""
        plan, size = gather.plan, block.shape[0]
        param = self._params[plan.name].data
        if plan.cat_dim == 1:
            rows, cols = gather.shard_shape
            param.view(rows, size, cols).copy_(block.transpose(0, 1))  # [out, member, in/member]
            return 0
        assert plan.cat_dim == 0 and plan.keep_rows is not None, plan.name
        block = block.reshape(size * gather.shard_shape[0], *gather.shard_shape[1:])  # members' rows in order
        extra = 0
        if plan.realign:  # vocab padded differently for t and t_g: collect all rows, keep ours
            full = all_gather_rows(block, self.inference_layout.tp_g_group)
            extra, block = (full.numel() - block.numel()) * full.element_size(), full
        param.copy_(block[plan.keep_rows[0]:plan.keep_rows[1]])
        return extra

    def to_train(self) -> DecoderModel:
        """Release the inference weights and gather buffers; return the (untouched) training model."""
        self._release()
        self._kept = []
        self.active = False
        return self.train_model

    def _release(self) -> None:
        for param in self._params.values():
            param.data = torch.empty(0, dtype=self.dtype, device=self.device)

    def _launch(self, k: int):
        """Pack this rank's tensors of bucket k into its segment and start the bucket's all-gather."""
        group, size = self._gather_group(), self._sizes[k]
        buffer = torch.empty(group.size() * size, dtype=self.dtype, device=self.device)
        own = buffer[self._member * size:(self._member + 1) * size]
        tensors = self._pack[k]
        used = sum(t.numel() for t in tensors)
        if used:
            torch.cat([t.detach().reshape(-1) for t in tensors], out=own[:used])
        return buffer, all_gather_flat(buffer, own, group, async_op=True)

    def _drop(self, buffers: list, indices: list[int]) -> None:
        """Forget assembled buckets' buffers (freed unless views or keep_buffers hold them)."""
        for b in indices:
            if self.keep_buffers and buffers[b] is not None:
                self._kept.append(buffers[b])
            buffers[b] = None

    def _is_own(self, piece: Piece) -> bool:
        return piece.member == self._member

    def _piece(self, piece: Piece, buffers: list) -> torch.Tensor:
        """One piece: this rank's own pieces are the training tensors, others views of a bucket buffer."""
        meta = piece.meta
        if self._is_own(piece):
            return self._train_params[meta.hf_name].detach()
        start = piece.member * self._sizes[piece.bucket] + piece.offset
        return buffers[piece.bucket][start:start + meta.numel].view(meta.shape)

    def _copy_run(self, run: Run, buffers: list) -> None:
        """Copy a run of dim-0 parameters: rows = the r pieces of each, in one kernel."""
        size = self._sizes[run.bucket]
        rows = buffers[run.bucket].view(-1, size)[run.member:run.member + run.rows, run.start:run.stop]  # [r, run]
        outs = [self._params[plan.name].data.view(run.rows, -1) for plan in run.plans]  # [r, piece numel] each
        torch.split_with_sizes_copy(rows, [plan.pieces[0].meta.numel for plan in run.plans], dim=1, out=outs)

    def _build(self, plan: ParamPlan, buffers: list) -> int:
        """Build one inference parameter (view, or copy into its flat slot); returns extra bytes received."""
        parts = [self._piece(p, buffers) for p in plan.pieces]
        param = self._params[plan.name]
        if not self._copy_mode:  # one piece: reuse it as is
            assert len(parts) == 1 and plan.keep_rows is None and tuple(parts[0].shape) == plan.shape, plan.name
            param.data = parts[0]
            return 0
        block = parts[0] if len(parts) == 1 else None
        if plan.realign or plan.keep_rows is not None:
            block = block if block is not None else torch.cat(parts, dim=plan.cat_dim)
            extra = 0
            if plan.realign:  # vocab padded differently for t and t_g: collect all rows, keep ours
                full = all_gather_rows(block, self.inference_layout.tp_g_group)
                extra, block = (full.numel() - block.numel()) * full.element_size(), full
            param.data.copy_(block[plan.keep_rows[0]:plan.keep_rows[1]])
            return extra
        if block is not None:
            param.data.copy_(block)
        else:
            torch.cat(parts, dim=plan.cat_dim, out=param.data)
        return 0

    def _redundant_bytes(self, flat: torch.Tensor | None, buffer_bytes: int) -> int:
        """Weight bytes held in inference mode (training tensors, flat generation shard, gather buffers
        still referenced) minus one generation shard."""
        held = sum(p.numel() * p.element_size() for p in self.train_model.parameters())
        if flat is not None:
            held += flat.numel() * flat.element_size()
        if not self._copy_mode or self.keep_buffers:  # views (or the naive baseline) keep the buffers
            held += buffer_bytes
        return held - sum(p.numel() * p.element_size() for p in self._params.values())


class NaiveGatherEngine(HybridEngine):
    """DeepSpeed-Chat-style baseline: every rank all-gathers every rank's whole training shard over the
    world (bucketed like HybridEngine) and keeps the gathered buffers during generation; the
    inference model is cut out of them. Same interface and stats as HybridEngine."""

    keep_buffers = True
    direct_capable = False

    def _gather_group(self) -> dist.ProcessGroup:
        return dist.group.WORLD

    def _tensors_to_send(self) -> list[tuple[str, torch.Tensor]]:
        return list(self._train_params.items())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def inference_model(model: DecoderModel, layout: Layout, tp_g: int | None = None):
    """`with inference_model(stage, layout, tp_g) as (model, inference_layout): ...` — a one-off HybridEngine
    (collective), resharded on entry and released on exit. Long-lived users (the rollout worker) keep
    their HybridEngine instead."""
    engine = HybridEngine(model, layout, model.config, tp_g)
    try:
        yield engine.to_inference(), engine.inference_layout
    finally:
        engine.to_train()
