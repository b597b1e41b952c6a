"""TrainEngine: one pipeline stage trained with 1F1B, data parallel (bucketed all-reduce), ZeRO-1 AdamW,
mixed precision (bf16 or fp32 params, fp32 masters and grads), exact global grad-norm clipping.

    engine = TrainEngine(build_stage(config, layout), layout, OptimConfig(lr=1e-5), param_dtype=torch.bfloat16)
    mbs = causal_lm_microbatches(input_ids, attention_mask, num_microbatches=4)   # this dp rank's share
    metrics = engine.forward_backward(mbs, next_token_loss(engine))            # {"loss": ..., ...}
    stats = engine.optimizer_step()                                             # {"grad_norm", "lr"}
    outs = engine.forward_only(mbs, lambda hidden, mb: {"logp": ...})           # list[dict], all ranks

Contracts
- Every rank of the layout calls the same methods in the same order (collective).
- `microbatches`: this dp rank's micro-batches (dicts of tensors, on any device: the engine moves
  them to the model's device); every pipeline stage of the replica gets the same list. The default
  forward_step reads "input_ids" [B,S] (first stage), "position_ids" [B,S] and "attention_mask" [B,S]
  (optional), or a packed micro-batch's "cu_seqlens" (trainer/packing.py), and runs
  `model(inputs, position_ids, attention_mask, return_hidden=True, cu_seqlens=...)`; pass `forward_step=` to change it.
- `loss_fn(output, microbatch) -> (loss_sum, metrics)` runs on the last stage: `loss_sum` is the
  SUM of the per-token loss over the tokens counted by `microbatch[loss_mask_key]`. The engine divides
  it by the global count (summed over micro-batches and dp ranks, computed up front), so the
  gradient is that of the token-mean over the global batch, identical for any (tp, pp, dp) and any
  micro-batch split. `loss_normalizer=` overrides the count (e.g. number of sequences).
- Returned metrics are the same on every rank: "loss" is the exact global token-mean; other
  metrics are averaged over micro-batches and dp ranks.
- One `forward_backward` per optimizer step (pass `sync_grads=False` to all but the last call to
  accumulate over several calls).
- Construction moves every parameter's storage into one flat buffer (ZeRO-1 all-gather target) and
  gives it an fp32 `main_grad`; anything that caches parameter data pointers (CUDA graphs, an
  inference engine sharing the weights) must be built after the engine. Parameters keep their
  identity and values; `.grad` stays None (gradients live in `main_grad`).

- Optimizer offload (`offload_optimizer=True`): fp32 masters and Adam moments on the host, the
  AdamW step on the CPU (see `parallel/zero.py`); results equal the on-device optimizer's.
- Rollout hand-over: `offload_training_state()` moves what only training needs (the fp32 gradient
  buffer, device-resident masters and Adam moments) to the host and frees its device memory, so the
  rollout's KV cache can take it; `reload_training_state()` brings it back (values unchanged). Call
  them around generation, after `optimizer_step()` and before the next `forward_backward()`.

Parallel parts live in `verl_mega/parallel/` (p2p, pipeline, data_parallel, zero, grad_clip); this
file wires them. Checkpointing: `verl_mega/trainer/checkpoint.py` (`state_dict()` here gives the
layout-independent DCP dict).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from verl_mega.parallel import pipeline
from verl_mega.parallel.data_parallel import DEFAULT_BUCKET_MB, DataParallelGrads
from verl_mega.parallel.dist import new_group
from verl_mega.parallel.grad_clip import clip_grads_, counts_for_norm, global_grad_norm
from verl_mega.parallel.layout import Layout, layout_group_ranks
from verl_mega.parallel.offload import StorageStash
from verl_mega.parallel.p2p import PipeComm
from verl_mega.parallel.zero import DEFAULT_OFFLOAD_BUCKET_NUMEL, ZeroOptimizer
from verl_mega.trainer.optim import OptimConfig, make_adamw, make_scheduler
from verl_mega.trainer.packing import microbatch_to


def default_forward_step(model, microbatch: dict, input_tensor: torch.Tensor | None) -> torch.Tensor:
    """input_ids (first stage) or the received hidden [B,S,H] -> hidden [B,S,H] (final-normed on the last stage).

    A packed micro-batch (see trainer/packing.py) has B = 1, S = T and carries "cu_seqlens" instead of
    "attention_mask"; its pipeline activations are [1, T, H], T differing per micro-batch.
    A VLM micro-batch (trainer/batch.py) has position_ids [3, B, S] and, when it has images, "pixel_values"
    and "image_grid_thw": the first stage's vision tower encodes them once and, with "image_index", the
    encoded rows fill the image-pad tokens in that order (rows of one prompt share its encoding)."""
    inputs = microbatch["input_ids"] if input_tensor is None else input_tensor
    images = {}
    if input_tensor is None and "pixel_values" in microbatch:
        embeds = model.encode_images(microbatch["pixel_values"], microbatch["image_grid_thw"])  # [N_encoded, H]
        if "image_index" in microbatch:
            embeds = embeds[microbatch["image_index"]]  # [N_pad_tokens, H]
        images = {"image_embeds": embeds}
    return model(inputs, microbatch["position_ids"], microbatch.get("attention_mask"), return_hidden=True,
                 cu_seqlens=microbatch.get("cu_seqlens"), **images)


class TrainEngine:
    """Trains one pipeline stage (`model_stage`) of a model laid out by `layout` (see module docstring).

    param_dtype: dtype of the model parameters (torch.float32 or torch.bfloat16); masters, grads
    and Adam states are fp32. bucket_mb: size of the dp all-reduce buckets. offload_optimizer: fp32
    masters and Adam moments on the host, AdamW step on the CPU, `offload_bucket_numel` elements at a time.
    """

    def __init__(self, model_stage: torch.nn.Module, layout: Layout, optim_config: OptimConfig, *,
                 param_dtype: torch.dtype = torch.float32, bucket_mb: float = DEFAULT_BUCKET_MB,
                 offload_optimizer: bool = False, offload_bucket_numel: int = DEFAULT_OFFLOAD_BUCKET_NUMEL):
        if param_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"param_dtype must be torch.float32 or torch.bfloat16, got {param_dtype}")
        self.model = model_stage.to(param_dtype)
        self.layout, self.optim_config = layout, optim_config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("model_stage has no trainable parameters")
        self.device = params[0].device
        self.shared_group = _embedding_group(layout) if layout.pp > 1 else None
        shared = [p for p in params if getattr(p, "shared_embedding", False)]
        if shared and self.shared_group is not None:
            with torch.no_grad():  # the last stage's head copy starts equal to the first stage's embedding
                for p in shared:
                    dist.broadcast(p.data, src=layout.first_stage_rank, group=self.shared_group)
        self.grads = DataParallelGrads(params, layout.dp_group, bucket_mb=bucket_mb,
                                       shared_group=self.shared_group, shared_params=shared)
        self.zero = ZeroOptimizer(params, layout.dp_group, lambda masters: make_adamw(
            masters, optim_config, fused=True if offload_optimizer else None), offload=offload_optimizer,
            offload_bucket_numel=offload_bucket_numel)
        self.scheduler = make_scheduler(self.zero.optimizer, optim_config)
        self._norm_flags = [counts_for_norm(p, tp_rank=layout.tp_rank, is_first_stage=layout.is_first_stage)
                            for p in self.zero.owned]
        self.comm = PipeComm(layout, self.device) if layout.pp > 1 else None
        self.step = 0  # optimizer_step() calls so far
        self.skipped_steps = 0  # steps skipped for a non-finite grad norm
        self.adam_steps = 0  # updates applied (AdamW step count, LR-schedule position)
        self._grads_synced = False
        self._grads_zero = True  # no gradient accumulated since the last zero_grad()
        self._stash: StorageStash | None = None  # training state moved off the device (rollout hand-over)

    # ------------------------------------------------------------------ training
    def forward_backward(self, microbatches: list[dict], loss_fn: Callable, *, forward_step: Callable | None = None,
                         loss_mask_key: str = "loss_mask", loss_normalizer: float | None = None,
                         sync_grads: bool = True) -> dict[str, float]:
        """Forward + backward of this dp rank's micro-batches with the 1F1B schedule; grads land in
        `param.main_grad` (summed over dp when `sync_grads`). Returns metrics (same on all ranks)."""
        self._check_resident("forward_backward")
        if self._grads_synced:
            raise ValueError("forward_backward: gradients were already synchronised; call optimizer_step() or "
                             "zero_grad() first, or pass sync_grads=False to all but the last call")
        microbatches = _to_device(microbatches, self.device)
        if loss_normalizer is None:
            loss_normalizer = self.global_token_count(microbatches, loss_mask_key)
        if not loss_normalizer > 0:
            raise ValueError(f"loss normaliser must be positive, got {loss_normalizer} (empty {loss_mask_key!r}?)")

        def scaled_loss(output, mb):
            loss_sum, metrics = loss_fn(output, mb)
            return loss_sum / loss_normalizer, metrics

        self.model.train()
        self._grads_zero = False
        per_mb = pipeline.forward_backward(
            self.model, microbatches, forward_step=forward_step or default_forward_step, loss_fn=scaled_loss,
            comm=self.comm, before_last_backward=self.grads.before_last_backward if sync_grads else None)
        if sync_grads:
            self.grads.finish()
            self._grads_synced = True
        return self._reduce_metrics(per_mb)

    def global_token_count(self, microbatches: list[dict], key: str = "loss_mask") -> float:
        """Sum of `mb[key]` over the micro-batches of all dp ranks (the loss normaliser)."""
        missing = [i for i, mb in enumerate(microbatches) if key not in mb]
        if missing:
            raise ValueError(f"micro-batches {missing} have no {key!r} entry (needed to normalise the loss); "
                             f"add it or pass loss_normalizer=")
        count = torch.stack([mb[key].to(self.device).float().sum() for mb in microbatches]).sum().reshape(1)
        if self.layout.dp > 1:
            dist.all_reduce(count, group=self.layout.dp_group)
        return count.item()

    def optimizer_step(self) -> dict[str, float]:
        """Clip by the global grad norm, AdamW step on this rank's ZeRO shard, all-gather params, zero grads.

        Returns {"grad_norm": norm before clipping, "lr": learning rate used}. A non-finite norm skips
        the update (counted in `skipped_steps`)."""
        self._check_resident("optimizer_step")
        if not self._grads_synced:
            self.grads.finish()
        counted = [g for g, flag in zip(self.zero.owned_grads(), self._norm_flags) if flag]  # on the device
        norm = global_grad_norm(counted, [self.layout.mp_group, self.layout.dp_group])
        lr, norm_value = self.zero.lr, norm.item()
        if math.isfinite(norm_value):
            clip_grads_(self.zero.owned_grads(), self.optim_config.clip_grad, norm)
            self.zero.step()
            self.scheduler.step()
            self.adam_steps += 1
        else:
            self.skipped_steps += 1
        self.zero_grad()
        self.step += 1
        return {"grad_norm": norm_value, "lr": lr}

    def zero_grad(self) -> None:
        """Drop accumulated gradients."""
        self._check_resident("zero_grad")
        self.grads.zero()
        for m in self.zero.masters:
            m.grad = None
        self._grads_synced = False
        self._grads_zero = True

    # ------------------------------------------------------------------ rollout hand-over
    def offload_training_state(self) -> int:
        """Move the training-only device state (fp32 gradient buffer; fp32 masters and Adam moments
        unless the optimizer is offloaded already) to the host and free its device memory; the
        weights stay. Gradients right after `optimizer_step()`/`zero_grad()` are zero and are not
        copied. Returns the bytes freed on the device. Not collective."""
        if self._stash is not None:
            return 0
        zero_grads = self._grads_zero and not self._grads_synced
        grads, state = StorageStash([self.grads.buffer]), StorageStash(self.zero.device_state())
        freed = grads.stash(keep_values=not zero_grads) + state.stash()
        self._stash = (grads, state)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the freed blocks back for the KV cache
        return freed

    def reload_training_state(self) -> None:
        """Bring back what `offload_training_state()` moved (values unchanged)."""
        if self._stash is None:
            return
        for stash in self._stash:
            stash.restore()
        self._stash = None

    @property
    def training_state_offloaded(self) -> bool:
        """Whether `offload_training_state()` is in effect."""
        return self._stash is not None

    def _check_resident(self, what: str) -> None:
        if self._stash is not None:
            raise ValueError(f"{what}: the training state is offloaded; call reload_training_state() first")

    @torch.no_grad()
    def forward_only(self, microbatches: list[dict], output_fn: Callable, *,
                     forward_step: Callable | None = None) -> list[dict[str, torch.Tensor]]:
        """Forward every micro-batch; `output_fn(output, mb) -> dict[str, Tensor]` runs on the last stage,
        and the per-micro-batch dicts are returned on every rank of the pipeline."""
        return pipeline.forward_only(self.model, _to_device(microbatches, self.device),
                                     forward_step=forward_step or default_forward_step,
                                     output_fn=output_fn, comm=self.comm)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Layout-independent DCP state dict of this rank (see checkpoint.py)."""
        from verl_mega.trainer.checkpoint import engine_state_dict
        return engine_state_dict(self)

    def load_state_dict(self, state: dict) -> None:
        """Install a state filled by `checkpoint.read_engine_state` (see checkpoint.py)."""
        from verl_mega.trainer.checkpoint import apply_engine_state
        apply_engine_state(self, state)

    # ------------------------------------------------------------------ helpers
    def _reduce_metrics(self, per_mb: list[dict]) -> dict[str, float]:
        """Loss summed (already normalised), other metrics averaged over micro-batches and dp; sent to all stages."""
        result = None
        if self.layout.is_last_stage:
            names = list(per_mb[0])
            values = torch.stack([torch.stack([torch.as_tensor(m[k], dtype=torch.float32, device=self.device)
                                               .detach().reshape(()) for k in names]) for m in per_mb])
            values = torch.cat([values[:, :1].sum(0), values[:, 1:].mean(0)])  # [num_metrics]
            if self.layout.dp > 1:
                dist.all_reduce(values, group=self.layout.dp_group)
                values[1:] /= self.layout.dp
            result = dict(zip(names, values.tolist()))
        if self.layout.pp > 1:
            box = [result]
            dist.broadcast_object_list(box, src=self.layout.last_stage_rank, group=self.layout.pp_group,
                                       device=self.device)
            result = box[0]
        return result


def _to_device(microbatches: list[dict], device: torch.device) -> list[dict]:
    """The micro-batches on `device` (the model's), host keys left where they are (packing.microbatch_to)."""
    return [microbatch_to(mb, device) for mb in microbatches]


def _embedding_group(layout: Layout):
    """This rank's (first stage, last stage) group for tied-embedding grads; creates all such groups (collective)."""
    mine = None
    for members in layout_group_ranks(layout.tp, layout.pp, layout.dp)["pp"]:
        group = new_group([members[0], members[-1]])
        if layout.rank in (members[0], members[-1]):
            mine = group
    return mine


def causal_lm_microbatches(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           num_microbatches: int = 1) -> list[dict[str, torch.Tensor]]:
    """Split a batch into next-token micro-batches.

    input_ids [B, S], attention_mask [B, S] (1 = token; left or right padding). Each micro-batch has
    input_ids, attention_mask, position_ids (count of real tokens before each position),
    labels [b, S] (= input_ids shifted left by one) and loss_mask [b, S] (1 where position t and t+1
    are both real tokens). B must be divisible by num_microbatches.
    """
    b, s = input_ids.shape
    if num_microbatches < 1 or b % num_microbatches:
        raise ValueError(f"batch size {b} is not divisible by num_microbatches={num_microbatches}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [batch, seq]
    labels = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)  # [batch, seq]
    loss_mask = torch.cat([attention_mask[:, :-1] * attention_mask[:, 1:], torch.zeros_like(attention_mask[:, :1])],
                          dim=1).float()
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
             "labels": labels, "loss_mask": loss_mask}
    size = b // num_microbatches
    return [{k: v[i * size:(i + 1) * size] for k, v in batch.items()} for i in range(num_microbatches)]


def next_token_loss(engine: TrainEngine, temperature: float = 1.0) -> Callable:
    """loss_fn for `forward_backward`: (-sum of log p(label) over loss_mask, {}) from the last stage's
    final hidden states, with the vocabulary split over tp (`vocab_parallel_log_probs`)."""
    from verl_mega.parallel.vocab_parallel import vocab_parallel_log_probs  # imports megatron-core: only when used

    model, tp_group = engine.model, engine.layout.tp_group

    def loss_fn(hidden: torch.Tensor, mb: dict) -> tuple[torch.Tensor, dict]:
        logp = vocab_parallel_log_probs(hidden, model.output_weight(), mb["labels"].to(hidden.device),
                                        tp_group=tp_group, vocab_start=model.vocab_start_index,
                                        true_vocab_size=model.true_vocab_size, temperature=temperature)
        return -(logp * mb["loss_mask"].to(logp.device)).sum(), {}

    return loss_fn
