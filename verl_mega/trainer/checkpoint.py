"""Distributed checkpoints with torch.distributed.checkpoint (DCP), loadable into a different (tp, pp, dp).

Layout-independent content (one DCP entry per GLOBAL parameter, keyed by its HF name, which carries
the global layer index):
- "model/<name>": fp32 master weight; TP-sharded parameters as a DTensor on the tp mesh
  (`Shard(partition_dim)`), replicated ones as plain tensors (DCP writes one copy).
- "optim/<name>/exp_avg", ".../exp_avg_sq": AdamW moments, same layout as the weight.
- "engine/adam_steps": optimizer steps applied (AdamW step count and LR-schedule position).
- "rng/rank<r>/cpu" (+ "/cuda"): RNG states per global rank (restored when that rank exists).
With ZeRO-1 each parameter is written by its owner dp rank; tied embeddings (pp > 1) once, from the
first stage. On load every rank reads the weights of all its parameters and the moments of the
ones it owns; DCP reshards DTensors to the new tp. A padded-vocab tensor whose padded size differs
(tp not dividing 128) is read whole and the rows of the local shard are cut out.

Directory protocol (atomic): ranks write `step_N.tmp/`; rank 0 then writes `client_state.pt`
(step, caller's data position, ...) and the `COMPLETE` marker (JSON: layout, step, model config as
a HF config dict, the source model directory as an absolute `tokenizer_path`), fsyncs, renames to
`step_N/` and keeps the newest `keep_last`.
`load_checkpoint(engine, root)` takes the newest complete `step_N`; one without a readable marker
or DCP metadata is refused with a message naming it, and the previous one is tried.

Reference: PyTorch Distributed Checkpoint docs; TorchTitan `checkpoint.py`. Simplification: the
file system must be shared by all ranks (one node, or a shared mount).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from verl_mega.trainer.optim import set_schedule_step

log = logging.getLogger(__name__)
MARKER = "COMPLETE"
CLIENT_STATE = "client_state.pt"
TIED_KEY = "model.embed_tokens.weight"
_STEP_DIR = re.compile(r"^step_(\d+)$")


# ---------------------------------------------------------------------------------------------- naming
def param_keys(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter, str]]:
    """(local name, parameter, global key) of a stage; the key is the HF name (`model.hf_name`) or,
    for a model without one, the local name. The last stage's tied head copy maps to the embedding."""
    out = []
    for name, p in model.named_parameters():
        key = model.hf_name(name) if hasattr(model, "hf_name") else name
        if getattr(p, "shared_embedding", False):
            key = TIED_KEY
        out.append((name, p, key))
    return out


def _is_tp_sharded(p: torch.Tensor, tp: int) -> bool:
    return tp > 1 and bool(getattr(p, "tensor_model_parallel", False))


def _tp_mesh(layout, device: torch.device) -> DeviceMesh | None:
    if layout.tp == 1:
        return None
    cache = layout.__dict__.setdefault("_ckpt_tp_mesh", {})
    if device.type not in cache:
        cache[device.type] = DeviceMesh.from_group(layout.tp_group, device_type=device.type)
    return cache[device.type]


def _wrap(t: torch.Tensor, p: torch.Tensor, layout) -> torch.Tensor:
    """Local value -> DCP entry: DTensor shard for TP-sharded parameters (on a mesh of the value's
    device type: host-offloaded optimizer state stays on the host), plain tensor otherwise."""
    t = t.detach().clone() if t._base is not None else t.detach()  # a view would drag its whole buffer along
    if _is_tp_sharded(p, layout.tp):
        return DTensor.from_local(t, _tp_mesh(layout, t.device), [Shard(p.partition_dim)], run_check=False)
    return t


# ---------------------------------------------------------------------------------------------- engine state
def engine_state_dict(engine) -> dict:
    """This rank's DCP entries (see module docstring)."""
    layout, zero = engine.layout, engine.zero
    out = {}
    for _, p, key in param_keys(engine.model):
        if not zero.owns(p) or (getattr(p, "shared_embedding", False) and not layout.is_first_stage):
            continue
        out[f"model/{key}"] = _wrap(zero.master_of(p), p, layout)
        for name, value in zero.adam_state(p).items():
            out[f"optim/{key}/{name}"] = _wrap(value, p, layout)
    out["engine/adam_steps"] = torch.tensor(engine.adam_steps, dtype=torch.int64)
    out[f"rng/rank{dist.get_rank()}/cpu"] = torch.get_rng_state()
    if engine.device.type == "cuda":
        out[f"rng/rank{dist.get_rank()}/cuda"] = torch.cuda.get_rng_state()
    return out


def _target(meta, key: str, p: torch.Tensor, layout, mesh, device) -> torch.Tensor:
    """Empty fp32 load target for `key`: a DTensor shard when the saved global shape matches this
    layout's, else the whole saved tensor (vocab padding differs, or a replicated parameter)."""
    if key not in meta.state_dict_metadata:
        raise ValueError(f"checkpoint has no entry {key!r}: it was saved from a different model")
    saved = tuple(meta.state_dict_metadata[key].size)
    local = torch.empty(p.shape, dtype=torch.float32, device=device)
    if _is_tp_sharded(p, layout.tp):
        full = list(p.shape)
        full[p.partition_dim] *= layout.tp
        if tuple(full) == saved:
            return DTensor.from_local(local, mesh, [Shard(p.partition_dim)], run_check=False)
    return torch.empty(saved, dtype=torch.float32, device=device)


def _local_value(loaded: torch.Tensor, p: torch.Tensor, layout, key: str) -> torch.Tensor:
    """This rank's shard (p's shape) of a loaded target from `_target`."""
    if isinstance(loaded, DTensor):
        return loaded.to_local()
    if tuple(loaded.shape) == tuple(p.shape) and not _is_tp_sharded(p, layout.tp):
        return loaded
    dim = getattr(p, "partition_dim", 0)
    if loaded.dim() != p.dim() or any(a != b for i, (a, b) in enumerate(zip(loaded.shape, p.shape)) if i != dim):
        raise ValueError(f"checkpoint entry {key!r} has shape {tuple(loaded.shape)}, incompatible with the "
                         f"local parameter shape {tuple(p.shape)} at tp={layout.tp}")
    rows = p.shape[dim]
    start = layout.tp_rank * rows if _is_tp_sharded(p, layout.tp) else 0
    n = max(0, min(rows, loaded.shape[dim] - start))  # padded rows beyond the saved tensor stay zero
    out = torch.zeros(p.shape, dtype=loaded.dtype, device=loaded.device)
    out.narrow(dim, 0, n).copy_(loaded.narrow(dim, start, n))
    return out


def read_engine_state(engine, path: str) -> dict:
    """Read from checkpoint directory `path` everything this rank needs (collective over the world)."""
    meta = dcp.FileSystemReader(path).read_metadata()
    layout, device = engine.layout, engine.device
    mesh = _tp_mesh(layout, device)
    state = {}
    for _, p, key in param_keys(engine.model):
        state[f"model/{key}"] = _target(meta, f"model/{key}", p, layout, mesh, device)
        if engine.zero.owns(p) and f"optim/{key}/exp_avg" in meta.state_dict_metadata:
            for name in ("exp_avg", "exp_avg_sq"):
                state[f"optim/{key}/{name}"] = _target(meta, f"optim/{key}/{name}", p, layout, mesh, device)
    state["engine/adam_steps"] = torch.zeros((), dtype=torch.int64)
    for kind, current in (("cpu", torch.get_rng_state),
                          ("cuda", torch.cuda.get_rng_state if device.type == "cuda" else None)):
        key = f"rng/rank{dist.get_rank()}/{kind}"
        if current is not None and key in meta.state_dict_metadata:
            state[key] = torch.empty_like(current())
    dcp.load(state, storage_reader=dcp.FileSystemReader(path))
    return state


@torch.no_grad()
def apply_engine_state(engine, state: dict) -> None:
    """Install a state from `read_engine_state`: params, fp32 masters, Adam moments, LR position, RNG."""
    layout, zero = engine.layout, engine.zero
    adam_steps = int(state["engine/adam_steps"])
    for _, p, key in param_keys(engine.model):
        value = _local_value(state[f"model/{key}"], p, layout, f"model/{key}")
        p.data.copy_(value)
        if zero.owns(p):
            zero.master_of(p).copy_(value)
            if adam_steps > 0 and f"optim/{key}/exp_avg" in state:
                moments = [_local_value(state[f"optim/{key}/{n}"], p, layout, key) for n in ("exp_avg", "exp_avg_sq")]
                zero.set_adam_state(p, *moments, step=adam_steps)
    set_schedule_step(zero.optimizer, engine.scheduler, engine.optim_config, adam_steps)
    engine.adam_steps = adam_steps
    rank = dist.get_rank()
    if f"rng/rank{rank}/cpu" in state:
        torch.set_rng_state(state[f"rng/rank{rank}/cpu"])
    if f"rng/rank{rank}/cuda" in state:
        torch.cuda.set_rng_state(state[f"rng/rank{rank}/cuda"])


# ---------------------------------------------------------------------------------------------- directories
def save_checkpoint(engine, root: str, step: int, *, data_state: dict | None = None, tokenizer_path: str | None = None,
                    keep_last: int = 3, extra: dict | None = None) -> str:
    """Save `engine` (+ the caller's `data_state`) as `root/step_<step>` atomically, keeping the newest
    `keep_last` complete checkpoints (0: all); returns the path. Collective over all ranks; the file system
    must be shared."""
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0 (0 = keep all), got {keep_last}")
    final = os.path.join(root, f"step_{step}")
    tmp = final + ".tmp"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dcp.save(engine_state_dict(engine), storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
    if dist.get_rank() == 0:
        _finalise(engine, tmp, final, step, data_state, tokenizer_path, extra)
        _prune(root, keep_last)
    dist.barrier()
    return final


def _finalise(engine, tmp: str, final: str, step: int, data_state, tokenizer_path, extra) -> None:
    """Rank 0: client state, COMPLETE marker (both fsynced), then the atomic rename."""
    layout = engine.layout
    client = {"step": step, "engine_step": engine.step, "skipped_steps": engine.skipped_steps,
              "data_state": data_state, "extra": extra}
    with open(os.path.join(tmp, CLIENT_STATE), "wb") as f:
        torch.save(client, f)
        f.flush()
        os.fsync(f.fileno())
    config = getattr(engine.model, "config", None)
    marker = {"format": 1, "step": step, "time": time.time(),
              "tokenizer_path": os.path.abspath(tokenizer_path) if tokenizer_path else None,
              "layout": {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp},
              "model_config": config.to_hf_dict() if hasattr(config, "to_hf_dict") else None,
              "value_head": bool(getattr(engine.model, "is_value_model", False))}
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump(marker, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(os.path.dirname(final) or ".")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: str, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints (0: all); drop leftovers of interrupted saves."""
    steps = sorted((s, p) for s, p in _step_dirs(root))
    complete = [(s, p) for s, p in steps if os.path.exists(os.path.join(p, MARKER))]
    for _, path in complete[:-keep_last] if keep_last else []:
        shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(root):
        if re.match(r"^step_\d+\.tmp$", name):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _step_dirs(root: str) -> list[tuple[int, str]]:
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = _STEP_DIR.match(name)
        if m and os.path.isdir(os.path.join(root, name)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return out


def read_marker(path: str) -> dict:
    """The COMPLETE marker of checkpoint directory `path`; ValueError naming `path` if it is partial or corrupt."""
    marker = os.path.join(path, MARKER)
    if not os.path.exists(marker):
        raise ValueError(f"checkpoint {path} is incomplete: no {MARKER} marker (the save did not finish)")
    try:
        with open(marker) as f:
            info = json.load(f)
        dcp.FileSystemReader(path).read_metadata()
    except Exception as exc:  # noqa: BLE001 - any unreadable piece makes the checkpoint unusable
        raise ValueError(f"checkpoint {path} is corrupt: cannot read its marker or DCP metadata ({exc})") from exc
    if not isinstance(info, dict) or "step" not in info:
        raise ValueError(f"checkpoint {path} is corrupt: marker {marker} has no 'step'")
    return info


def find_checkpoint(root_or_dir: str) -> tuple[str | None, list[str]]:
    """(newest complete checkpoint under `root_or_dir` or the directory itself, refusal messages).

    A directory holding a marker/DCP files is taken as one checkpoint (ValueError if unusable);
    otherwise the `step_N` sub-directories are tried newest first."""
    if os.path.exists(os.path.join(root_or_dir, MARKER)) or os.path.exists(os.path.join(root_or_dir, ".metadata")):
        read_marker(root_or_dir)
        return root_or_dir, []
    refused = []
    for _, path in sorted(_step_dirs(root_or_dir), reverse=True):
        try:
            read_marker(path)
            return path, refused
        except ValueError as exc:
            refused.append(f"refusing {exc}; falling back to an older checkpoint")
            log.warning(refused[-1])
    return None, refused


def read_data_state(path: str) -> dict | None:
    """The caller's `data_state` saved in checkpoint directory `path` (e.g. the prompt loader's position), read
    without loading any weights."""
    return torch.load(os.path.join(path, CLIENT_STATE), weights_only=False)["data_state"]


def load_checkpoint(engine, root_or_dir: str) -> dict | None:
    """Load the newest complete checkpoint into `engine` (collective). Returns None when there is
    none, else {"path", "step", "data_state", "extra", "marker", "refused"}."""
    path, refused = find_checkpoint(root_or_dir)
    if path is None:
        return None
    marker = read_marker(path)
    engine.load_state_dict(read_engine_state(engine, path))
    client = torch.load(os.path.join(path, CLIENT_STATE), weights_only=False)
    engine.step, engine.skipped_steps = client["engine_step"], client["skipped_steps"]
    return {"path": path, "step": client["step"], "data_state": client["data_state"], "extra": client["extra"],
            "marker": marker, "refused": refused}


@torch.no_grad()
def load_model_weights(model: torch.nn.Module, layout, path: str) -> None:
    """Fill a model stage (any layout, e.g. tp=pp=1 for export) with the weights of checkpoint `path`."""
    meta = dcp.FileSystemReader(path).read_metadata()
    device = next(model.parameters()).device
    mesh = _tp_mesh(layout, device)
    keys = param_keys(model)
    state = {f"model/{key}": _target(meta, f"model/{key}", p, layout, mesh, device) for _, p, key in keys}
    dcp.load(state, storage_reader=dcp.FileSystemReader(path))
    for _, p, key in keys:
        p.data.copy_(_local_value(state[f"model/{key}"], p, layout, key))
