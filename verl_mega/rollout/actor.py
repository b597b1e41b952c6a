"""`get_actor_model`: a HF directory -> this rank's stage of the model under a (tp, pp, dp) layout.

`HFActor` bundles what the engines need (the stage `model`, `layout`, `config`, `tokenizer`, `path`)
plus simple whole-model helpers for tests and evaluation: `logits()` / `values()` run the stages
forward one after another with plain send/recv of hidden states (no micro-batching, no grad) and
hand the full result to every rank; `scores()` reads a reward model's score at each row's last
real token (as transformers' `*ForSequenceClassification`); `save_hf()` writes a HF directory;
`generate()` runs the rollout service (`rollout_worker()`: the actor's one RolloutWorker, which owns
its HybridEngine). Works as one plain python process (world size 1) and under torchrun.

It lives in `rollout/`, above the model code, because it generates: `models` imports nothing above it.
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist

from verl_mega.hybrid_engine.reshard import HybridEngine
from verl_mega.models.config import ModelConfig
from verl_mega.models.decoder import DecoderModel
from verl_mega.models.hf_io import check_hf_dir, load_hf_weights, save_hf
from verl_mega.models.masks import position_ids_from_mask
from verl_mega.models.parallelize import build_stage, stage_layer_range
from verl_mega.models.tokenizer import load_tokenizer
from verl_mega.parallel.dist import device as comm_device
from verl_mega.parallel.layout import Layout
from verl_mega.rollout.engine_config import EngineConfig
from verl_mega.rollout.frontend import generate as generate_text
from verl_mega.rollout.frontend import stop_ids
from verl_mega.rollout.worker import HybridWeights, InPlaceWeights, RolloutWorker


class HFActor:
    """A HF model loaded onto this rank: `.model` (this rank's DecoderModel stage), `.layout`, `.config`,
    `.tokenizer` (or None), `.path` (the source directory)."""

    def __init__(self, model: DecoderModel, layout: Layout, config: ModelConfig, tokenizer, path: str):
        self.model, self.layout, self.config, self.tokenizer, self.path = model, layout, config, tokenizer, path
        self._worker: RolloutWorker | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def _run_stages(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Forward through the pipeline; the last stage's output on the last stage, None elsewhere."""
        layout, dev = self.layout, self.device
        input_ids = input_ids.to(dev)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(dev)
        position_ids = position_ids_from_mask(attention_mask)
        if layout.is_first_stage:
            inputs = input_ids
        else:
            inputs = torch.empty(*input_ids.shape, self.config.hidden_size, dtype=self.dtype, device=dev)
            dist.recv(inputs, src=layout.prev_stage_rank)
        out = self.model(inputs, position_ids, attention_mask)
        if not layout.is_last_stage:
            dist.send(out.contiguous(), dst=layout.next_stage_rank)
            return None
        return out

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full-vocabulary logits [B, S, vocab_size] (fp32, padding columns removed) on every rank.

        input_ids [B, S] (left padding fine), attention_mask [B, S] 1/0 (default all ones); every
        rank of a pipeline must pass the same batch. Logits at pad positions are meaningless.
        """
        if self.model.is_value_model:
            raise ValueError("logits(): this is a value model; use values()")
        layout = self.layout
        b, s = input_ids.shape
        out = self._run_stages(input_ids, attention_mask)
        full = torch.empty(b, s, self.config.vocab_size, dtype=torch.float32, device=self.device)
        if layout.is_last_stage:
            shard = out.float().contiguous()  # [batch, seq, V_pad/tp]
            if layout.tp > 1:
                parts = [torch.empty_like(shard) for _ in range(layout.tp)]
                dist.all_gather(parts, shard, group=layout.tp_group)
                shard = torch.cat(parts, dim=-1)  # [batch, seq, V_pad]
            full.copy_(shard[..., : self.config.vocab_size])
        if layout.pp > 1:
            dist.broadcast(full, src=layout.last_stage_rank, group=layout.pp_group)
        return full

    @torch.no_grad()
    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Values [B, S] (fp32) of a value model (value_head=True) on every rank."""
        if not self.model.is_value_model:
            raise ValueError("values(): this model has no value head (load with value_head=True)")
        out = self._run_stages(input_ids, attention_mask)
        full = out.contiguous() if out is not None else torch.empty(input_ids.shape, dtype=torch.float32, device=self.device)
        if self.layout.pp > 1:
            dist.broadcast(full, src=self.layout.last_stage_rank, group=self.layout.pp_group)
        return full

    @torch.no_grad()
    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Sequence scores [B] (fp32) of a score model (score_head=True) on every rank: the score head's
        output at each row's last real token (the last 1 of attention_mask [B, S]; left or right padding)."""
        if not self.model.is_score_model:
            raise ValueError("scores(): this model has no score head (load with score_head=True)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        values = self.values(input_ids, attention_mask)  # [batch, seq]
        cols = torch.arange(input_ids.shape[1], device=values.device)
        last = (cols * attention_mask.to(values.device).bool()).argmax(-1)  # [batch] rightmost real token
        return values.gather(1, last[:, None]).squeeze(1)

    def save_hf(self, out_dir: str | os.PathLike) -> None:
        """Write the model (+ tokenizer; a VLM's processor files) as a HF directory on global rank 0
        (collective over all ranks)."""
        save_hf(self.model, self.layout, out_dir, self.config, self.tokenizer)
        if self.layout.rank == 0:
            copy_processor_files(self.path, out_dir)

    def generate(self, prompts, **kw):
        """Generate responses with the rollout service: `verl_mega.rollout.generate(self, prompts, **kw)`."""
        return generate_text(self, prompts, **kw)

    def rollout_worker(self, tp_g: int | None = None, engine_config: EngineConfig | None = None,
                       free_cache: bool | None = None) -> RolloutWorker:
        """The actor's one RolloutWorker, created on first use and kept (collective when it builds a
        HybridEngine: pp > 1 or tp_g < tp).

        tp_g: generation tensor-parallel size; None keeps the existing worker's (default: the training tp);
        a different value replaces the worker. engine_config / free_cache: reconfigure it when given.
        """
        worker = self._worker
        tp_g = tp_g if tp_g is not None else (worker.tp_g if worker is not None else self.layout.tp)
        if worker is None or worker.tp_g != tp_g:
            if worker is not None:
                worker.release()
            if self.layout.pp == 1 and tp_g == self.layout.tp:
                weights = InPlaceWeights(self.model, self.layout.tp_group)
            else:
                weights = HybridWeights(HybridEngine(self.model, self.layout, self.config, tp_g))
            eos, pad = stop_ids(self)
            worker = self._worker = RolloutWorker(weights, eos_token_ids=eos, pad_token_id=pad, tp_g=tp_g)
        worker.configure(engine_config if engine_config is not None else worker.engine_config,
                         worker.free_cache if free_cache is None else free_cache)
        return worker

    def release_rollout(self) -> None:
        """Free the rollout worker's KV cache and CUDA graphs (e.g. before training resumes)."""
        if self._worker is not None:
            self._worker.release()

    def __repr__(self) -> str:
        return f"HFActor({self.path!r}, {self.config.model_type}, {self.layout}, dtype={self.dtype})"


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json", "chat_template.jinja")


def copy_processor_files(src: str | os.PathLike | None, dst: str | os.PathLike) -> list[str]:
    """Copy a model directory's processor files (a VLM's image processor config and chat template; what the
    tokenizer does not write) from `src` to `dst` where `dst` lacks them; returns the names copied."""
    if src is None or not os.path.isdir(src) or os.path.abspath(src) == os.path.abspath(dst):
        return []
    copied = []
    for name in PROCESSOR_FILES:
        source, target = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isfile(source) and not os.path.exists(target):
            shutil.copyfile(source, target)
            copied.append(name)
    return copied


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"torch_dtype {dtype!r} is not a torch dtype (e.g. torch.bfloat16 or 'bfloat16')")
    return value


def get_actor_model(path: str | os.PathLike, torch_dtype=torch.float32, tensor_parallel_size: int = 1,
                    pipeline_parallel_size: int = 1, layout: Layout | None = None, value_head: bool = False,
                    score_head: bool = False, device=None, use_vision: bool | None = None) -> HFActor:
    """Load the HF directory `path` as this rank's stage under `layout` (default `Layout.create(tp, pp)`,
    dp = whatever is left of the world). Collective when it creates the layout.

    torch_dtype: parameter dtype (torch dtype or its name). value_head: replace the LM head by a
    value head (critic). score_head: replace it by the score head of a HF `*ForSequenceClassification`
    checkpoint with one label (reward model; `score.weight` must be in the checkpoint).
    device: default the rank's compute device (its GPU under NCCL, else CPU).
    use_vision: True asks for a vision-language model (ValueError for a text-only directory); None / False load
    whatever the directory holds (a Qwen2.5-VL directory always with its vision tower).
    Raises FileNotFoundError for a missing directory/config/weights, ValueError for a layout that
    does not fit the model (heads not divisible by tp, fewer layers than pp) or a missing tensor.
    """
    path = check_hf_dir(path)
    config = ModelConfig.from_hf(path)
    if use_vision and not config.is_vlm:
        raise ValueError(f"use_vision=True: the model at {path} is {config.model_type}, not a vision-language "
                         f"model (Qwen2_5_VLForConditionalGeneration)")
    dtype = _as_dtype(torch_dtype)
    tp, pp = (layout.tp, layout.pp) if layout is not None else (tensor_parallel_size, pipeline_parallel_size)
    config.check_tp(tp)
    stage_layer_range(config.num_layers, pp, 0)  # fewer layers than stages -> ValueError before any collective
    if layout is None:
        layout = Layout.create(tp, pp)
    model = build_stage(config, layout, value_head=value_head, score_head=score_head, params_dtype=dtype,
                        device=device if device is not None else comm_device(), init_seed=None)
    load_hf_weights(model, path)
    return HFActor(model, layout, config, load_tokenizer(path), path)
