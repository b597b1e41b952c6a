"""Run a function on `world_size` CPU ranks (gloo) and collect each rank's return value.

Used by the distributed tests: `results = run_distributed(fn, 4, arg1, arg2)` spawns 4 processes
with torchrun's environment variables set, calls `fn(*args)` in each (it may build a `Layout`),
and returns the list of per-rank results (anything `torch.save` can store). An exception on any
rank fails the call with that rank's traceback; a rank that does not finish within `timeout_s`
fails it too (no silent hangs). The ranks die with the calling process however it ends (SIGKILL included):
Linux's parent-death signal, so that `verl-mega train` / `demo`, which spawn their ranks here, leave no
orphan training on.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux; a no-op elsewhere); exits now if the
    parent (`parent_pid`) is already gone. torch's spawn sets SIGINT as that signal, which a rank ignores when
    its command was started in the background by a script (`&` sets SIGINT to ignored, and children inherit it)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn, args, env: dict, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **env})
    torch.set_num_threads(1)
    from verl_mega.parallel.dist import shutdown_distributed

    try:
        result = fn(*args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:  # noqa: BLE001 - forwarded to the parent with the traceback
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"rank{rank}.pt"))
        shutdown_distributed(barrier=False)
        raise
    shutdown_distributed(barrier=True)  # destroyed before interpreter exit: see parallel/dist.py


STOP_GRACE_S = 5.0  # a rank interrupted with SIGINT gets this long to unwind before SIGKILL


def _stop(processes) -> None:
    """End the ranks still running (the caller failed, timed out or was interrupted): SIGINT first, so that each
    unwinds as on Ctrl-C (its own cleanup: no semaphores leaked to the resource tracker), SIGKILL after
    STOP_GRACE_S for one that does not end (blocked in a collective, or ignoring SIGINT)."""
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        try:
            os.kill(p.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_GRACE_S
    for p in alive:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()


def run_distributed(fn, world_size: int, *args, timeout_s: float = 300.0, env: dict | None = None) -> list:
    """Call `fn(*args)` on `world_size` spawned gloo ranks (also on a CUDA machine: the ranks outnumber its GPUs);
    return the list of results by rank."""
    env = {"VERL_MEGA_DIST_TIMEOUT": "120", "VERL_MEGA_DIST_BACKEND": "gloo", **(env or {})}
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(world_size, free_port(), out_dir, fn, args, env, os.getpid()),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed test did not finish within {timeout_s:.0f} s")
        except mp.ProcessRaisedException as exc:
            errors = []
            for r in range(world_size):
                path = os.path.join(out_dir, f"rank{r}.pt")
                if os.path.exists(path):
                    rec = torch.load(path, weights_only=False)
                    if not rec["ok"]:
                        errors.append(f"--- rank {r} ---\n{rec['error']}")
            raise RuntimeError("distributed test failed:\n" + "\n".join(errors or [str(exc)])) from None
        finally:
            _stop(ctx.processes)
        results = []
        for r in range(world_size):
            rec = torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            results.append(rec["result"])
        return results
