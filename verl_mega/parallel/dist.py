"""torch.distributed set-up: one entry point for torchrun, SLURM and a plain single process.

- Under torchrun (RANK/WORLD_SIZE/MASTER_ADDR in the environment) the default group is created
  from the environment; under `srun` without torchrun, SLURM_PROCID/SLURM_NTASKS are mapped to it.
- A plain `python` process gets a world of size 1 over an in-memory store, so the same code
  (which always passes explicit groups) runs unchanged.
- Backend: NCCL when CUDA is available, gloo otherwise. Every group gets a timeout
  (`VERL_MEGA_DIST_TIMEOUT` seconds, default 600) so a dead peer ends the job with an error
  instead of a silent hang.
- Shutdown: entry points call `shutdown_distributed()` when done (barrier with a timeout, then
  destroy every group); `init_distributed` also registers it (without the barrier) at interpreter exit
  for scripts that do not. A gloo group left alive into interpreter finalization can abort a finished
  run with "terminate called without an active exception" (SIGABRT): its worker threads still hold
  work objects whose tensors are freed after Python is gone (pytorch/pytorch#190489).
- CPU runs: megatron-core's advice to set CUDA_DEVICE_MAX_CONNECTIONS=1 (it orders CUDA kernels for
  comm/compute overlap) does not apply without CUDA; it is silenced there and only there.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
import warnings

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0
# torch 2.13 renamed the single-tensor collectives; the old names warn (FutureWarning) on every call
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def default_timeout_s() -> float:
    """Collective timeout in seconds: $VERL_MEGA_DIST_TIMEOUT or 600."""
    return float(os.environ.get("VERL_MEGA_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))


def _timeout(timeout_s: float | None) -> datetime.timedelta:
    return datetime.timedelta(seconds=timeout_s if timeout_s is not None else default_timeout_s())


def _from_slurm() -> None:
    """Map SLURM task variables to torchrun's names when launched by `srun python ...`."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and "MASTER_ADDR" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> None:
    """Initialise the default process group if it is not yet (idempotent).

    backend: "nccl" | "gloo"; None: $VERL_MEGA_DIST_BACKEND, else nccl where CUDA is available (one GPU per local
    rank: ValueError when a LOCAL_RANK has none) and gloo elsewhere."""
    if dist.is_initialized():
        return
    _from_slurm()
    backend = backend or os.environ.get("VERL_MEGA_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"process-group backend must be nccl or gloo (VERL_MEGA_DIST_BACKEND), got {backend!r}")
    if not torch.cuda.is_available():  # CUDA_DEVICE_MAX_CONNECTIONS only orders CUDA kernels: moot here
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if backend == "nccl":
            local_rank, gpus = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
            if local_rank >= gpus:
                raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {gpus} CUDA device(s): nccl needs one "
                                 f"GPU per rank; start at most {gpus} ranks per node, or run on CPU with "
                                 f"VERL_MEGA_DIST_BACKEND=gloo")
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, timeout=_timeout(timeout_s))
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=_timeout(timeout_s))
    atexit.register(shutdown_distributed, barrier=False)  # no-op once an entry point has shut down


def shutdown_distributed(barrier: bool = True, timeout_s: float | None = None) -> None:
    """Destroy every process group (idempotent: nothing to do without one).

    With `barrier` (the success path of an entry point), first wait until every rank got here, at most
    `timeout_s` seconds (default: the collective timeout, $VERL_MEGA_DIST_TIMEOUT), so no rank tears its
    group down while a peer still works (rank 0 writing the output) or exchanges with it; a barrier
    that fails or times out is reported and the groups are destroyed anyway. Without (an error path, or
    interpreter exit) destroy at once: a failed rank must not wait for peers that will never come."""
    if not dist.is_initialized():
        return
    try:
        if barrier and dist.get_world_size() > 1:
            kwargs = {"device_ids": [torch.cuda.current_device()]} if dist.get_backend() == "nccl" else {}
            dist.barrier(async_op=True, **kwargs).wait(timeout=_timeout(timeout_s))
    except RuntimeError as exc:  # a timed-out or broken barrier: still release the groups
        print(f"verl_mega: barrier before process-group shutdown failed ({exc}); shutting down anyway",
              file=sys.stderr)
    finally:
        dist.destroy_process_group()


def new_group(ranks: list[int], timeout_s: float | None = None) -> dist.ProcessGroup:
    """A process group over `ranks` with the collective timeout (collective over the world)."""
    return dist.new_group(ranks=list(ranks), timeout=_timeout(timeout_s))


def new_groups(groups_by_axis: dict[str, list[list[int]]], rank: int,
               timeout_s: float | None = None) -> dict[str, tuple[dist.ProcessGroup, list[int]]]:
    """Create every group of every axis (collective: all ranks, same order) and return, per axis, the
    group containing `rank` and its member list."""
    mine: dict[str, tuple[dist.ProcessGroup, list[int]]] = {}
    for axis, groups in groups_by_axis.items():
        for members in groups:
            group = new_group(members, timeout_s=timeout_s)
            if rank in members:
                mine[axis] = (group, members)
    return mine


def device() -> torch.device:
    """The device this rank computes on: its CUDA device under NCCL, else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
