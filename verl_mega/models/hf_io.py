"""Hugging Face checkpoints in and out of a TP/PP-sharded model.

Loading (`load_hf_weights`): every rank opens the safetensors file(s) of a local HF directory
(`model.safetensors`, else `model.safetensors.index.json` + shards, as transformers) and reads only what it owns with
`safe_open(...).get_slice(name)[...]`: its stage's layers, its TP slice along each parameter's
partition dim, vocabulary rows of its shard (rows past the true vocab are zero padding). Tied
checkpoints (no `lm_head.weight`) fill the head from `model.embed_tokens.weight`. A value head is
read from `score.weight`/`score.bias` (HF `*ForTokenClassification` with one label, as verl's critic
saves it) when present, else keeps its initialisation. A score head (reward model) is read from
`score.weight` (HF `*ForSequenceClassification` with one label, no bias), which must be present; it
is small and replicated, so every last-stage rank reads all of it.

Saving (`save_hf`, collective over all ranks of the layout): in data-parallel replica 0, each stage
all-gathers its TP shards over the tp group; every stage's tp-rank 0 sends its tensors to global
rank 0 (point-to-point, so gloo and NCCL both work), which strips the vocab padding and writes
`config.json` + `model.safetensors` (+ tokenizer files) that `transformers` loads unchanged.

Qwen2.5-VL: the vision tower (`visual.*`, replicated, on the first stage) is read whole by each of
the first stage's ranks and written by the first stage's tp-rank 0; names are the published ones
(`model.layers.*`, `visual.*`, as transformers' save_pretrained writes them); the layout of
transformers 4.52 - 4.57 (`model.language_model.*`, `model.visual.*`) is read too.

Simplification: the output is one safetensors file (no sharding into 5 GB pieces).
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from verl_mega.models.config import ModelConfig
from verl_mega.models.decoder import DecoderModel
from verl_mega.parallel.dist import device as comm_device
from verl_mega.parallel.layout import Layout

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def check_hf_dir(path: str | os.PathLike) -> str:
    """Return `path` as str; FileNotFoundError naming what is missing (directory or config.json)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path} does not exist (expected a local Hugging Face directory)")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{os.path.join(path, 'config.json')} does not exist (not a Hugging Face model directory)")
    return path


def weight_map(path: str) -> dict[str, str]:
    """{tensor name: safetensors file path} of a HF directory: `model.safetensors` when present, else the
    shards of `model.safetensors.index.json` (transformers' `from_pretrained` order, so that both read the same
    weights from a directory holding both)."""
    index = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(single):
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    if os.path.exists(index):
        with open(index) as f:
            files = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in files.items()}
    other = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
    hint = f" (found {other}: convert to safetensors)" if other else ""
    raise FileNotFoundError(f"no weights in {path}: neither {single} nor {index} exists{hint}")


def other_weight_files(path: str | os.PathLike) -> list[str]:
    """Weight files in directory `path` other than the `model.safetensors` that `save_hf` writes (a shard
    index, *.safetensors shards, pytorch_model*.bin), sorted; [] for a missing directory. Other files (e.g. a
    trainer's training_args.bin) are not weights."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return []
    return sorted(f for f in os.listdir(path) if f != SINGLE_FILE and (
        f.endswith(".safetensors") or (f.startswith("pytorch_model") and f.endswith(".bin"))
        or f in (INDEX_FILE, "pytorch_model.bin.index.json")))


def _source_name(model: DecoderModel, name: str) -> str:
    hf = model.hf_name(name)
    if hf == "lm_head.weight" and model.config.tie_word_embeddings:
        return "model.embed_tokens.weight"
    return hf


def _vlm_alias(source: str) -> str | None:
    """The name of a Qwen2.5-VL tensor in the layout transformers 4.52 - 4.57 wrote (`model.language_model.*`,
    `model.visual.*`) for the published layout that `hf_name` uses (`model.*`, `visual.*`)."""
    if source.startswith("visual."):
        return "model." + source
    if source.startswith("model."):
        return "model.language_model." + source[len("model."):]
    return None


@torch.no_grad()
def _read_shard(model: DecoderModel, name: str, param: torch.Tensor, tensor_slice, source: str, file: str) -> torch.Tensor:
    """This rank's slice of one checkpoint tensor, shaped like `param` (vocab rows zero-padded)."""
    file_shape = tuple(tensor_slice.get_shape())
    expected = model.full_shape(param)
    if model.is_vocab_param(name):
        expected = (model.true_vocab_size,) + expected[1:]
    if file_shape != expected:
        raise ValueError(f"tensor {source} in {file} has shape {file_shape}, the model expects {expected}")
    index = model.shard_slice(param)
    if not model.is_vocab_param(name):
        return tensor_slice[index] if param.dim() > 0 else tensor_slice[:]
    rows = index[0]
    out = torch.zeros(param.shape, dtype=param.dtype)
    stop = min(rows.stop, model.true_vocab_size)
    if stop > rows.start:
        out[: stop - rows.start] = tensor_slice[rows.start:stop]
    return out


@torch.no_grad()
def load_hf_weights(model: DecoderModel, path: str | os.PathLike) -> None:
    """Fill `model` (one stage, one TP rank) from the HF directory `path`, reading only its own slices.

    Raises FileNotFoundError for a missing directory / weight file, ValueError naming the tensor and
    the file for a missing tensor or a shape mismatch.
    """
    path = check_hf_dir(path)
    files = weight_map(path)
    with ExitStack() as stack:
        handles = {}
        for name, param in model.named_parameters():
            source = _source_name(model, name)
            if source not in files and model.config.is_vlm and _vlm_alias(source) in files:
                source = _vlm_alias(source)
            if source not in files:
                if source.startswith("score.") and not model.is_score_model:
                    continue  # value head not in a causal-LM checkpoint: keep its initialisation
                where = sorted(set(files.values()))
                raise ValueError(f"tensor {source} (for parameter {name}) not found in {', '.join(where)}")
            file = files[source]
            if file not in handles:
                handles[file] = stack.enter_context(safe_open(file, framework="pt"))
            shard = _read_shard(model, name, param, handles[file].get_slice(source), source, file)
            param.copy_(shard.to(param.dtype))


# ---------------------------------------------------------------------------------------------- saving
def full_tensor(model: DecoderModel, name: str, param: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The unsharded tensor of parameter `name`: TP shards all-gathered along the partition dim,
    vocabulary padding stripped (collective over the tp group for TP-sharded parameters)."""
    t = param.detach()
    if getattr(param, "tensor_model_parallel", False) and layout.tp > 1:
        parts = [torch.empty_like(t) for _ in range(layout.tp)]
        dist.all_gather(parts, t.contiguous(), group=layout.tp_group)
        t = torch.cat(parts, dim=param.partition_dim)
    if model.is_vocab_param(name):
        t = t[: model.true_vocab_size]
    return t.contiguous()


def _gather_stage(model: DecoderModel, layout: Layout) -> dict[str, torch.Tensor]:
    """Full (TP-gathered, vocab-unpadded) tensors of this stage keyed by HF name (collective over tp)."""
    out = {}
    for name, param in model.named_parameters():
        hf = model.hf_name(name)
        if hf == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # tied: HF stores only the embedding (written by the first stage)
        out[hf] = full_tensor(model, name, param, layout)
    return out


def _collect_on_rank0(tensors: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """Send every stage's tensors (held by its tp-rank 0 of dp replica 0) to global rank 0 (point-to-point)."""
    if layout.pp_rank > 0:
        meta = [[(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]]
        dist.send_object_list(meta, dst=layout.first_stage_rank)
        for v in tensors.values():
            dist.send(v, dst=layout.first_stage_rank)
        return {}
    full = {k: v.cpu() for k, v in tensors.items()}
    for src in layout.pp_ranks[1:]:
        meta = [None]
        dist.recv_object_list(meta, src=src)
        for key, shape, dtype in meta[0]:
            buf = torch.empty(shape, dtype=dtype, device=comm_device())
            dist.recv(buf, src=src)
            full[key] = buf.cpu()
    return full


def save_hf(model_stage: DecoderModel, layout: Layout, out_dir: str | os.PathLike, config: ModelConfig,
            tokenizer=None) -> None:
    """Write the whole model as a HF directory (config.json, model.safetensors, tokenizer files) on global rank 0.

    Collective: every rank of `layout` must call it. A value model is written as
    `*ForTokenClassification` with one label (`score.weight`, `score.bias`), a score model (reward
    model) as `*ForSequenceClassification` with one label (`score.weight`).
    """
    out_dir = os.fspath(out_dir)
    if config.is_vlm and model_stage.is_value_model:  # checked on every rank, before any collective
        raise ValueError("save_hf: a VLM with a value / score head has no transformers class to be saved as")
    if layout.dp_rank == 0:
        tensors = _gather_stage(model_stage, layout)
        if layout.tp_rank == 0:
            tensors = _collect_on_rank0(tensors, layout)
            if layout.rank == 0:
                _write_dir(tensors, out_dir, config, model_stage, tokenizer)
    dist.barrier()


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """t itself if it is contiguous and owns its whole storage, else a copy (safetensors refuses tensors that share
    storage, e.g. the q/k/v weights stacked in one buffer)."""
    if t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone()


def _write_dir(tensors: dict[str, torch.Tensor], out_dir: str, config: ModelConfig, model: DecoderModel, tokenizer) -> None:
    os.makedirs(out_dir, exist_ok=True)
    hf = config.to_hf_dict()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    hf["dtype"] = hf["torch_dtype"] = dtype
    if model.is_value_model:
        head = "ForSequenceClassification" if model.is_score_model else "ForTokenClassification"
        hf["architectures"] = [hf["architectures"][0].replace("ForCausalLM", head)]
        hf["id2label"], hf["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    save_file({k: _own_storage(v.cpu()) for k, v in sorted(tensors.items())}, os.path.join(out_dir, SINGLE_FILE),
              metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
