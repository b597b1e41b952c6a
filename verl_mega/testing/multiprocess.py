"""Run a function on `world_size` CPU ranks (gloo) and collect each rank's return value.

Used by the distributed tests: `results = run_distributed(fn, 4, arg1, arg2)` spawns 4 processes
with torchrun's environment variables set, calls `fn(*args)` in each (it may build a `Layout`),
and returns the list of per-rank results (anything `torch.save` can store). An exception on any
rank fails the call with that rank's traceback; a rank that does not finish within `timeout_s`
fails it too (no silent hangs). The ranks die with the calling process however it ends (SIGKILL included):
Linux's parent-death signal, so that `verl-mega train` / `demo`, which spawn their ranks here, leave no
orphan training on.

Start method: without CUDA the ranks are forks of a fork server (multiprocessing's forkserver) that imported
torch, megatron-core and the trainer once (FORKSERVER_PRELOAD): a spawned rank spends ~5 s of CPU importing
them, so a test suite of many small multi-rank runs on 2 cores pays that once, not on every call. They are
spawned with CUDA (a fork of a process that touched the driver cannot use CUDA) and under TRITON_INTERPRET
(Triton fixes interpreter mode when a kernel is decorated, at import, and the server imported ours without
it). Either way a rank sees the caller's environment as it was at the call (plus `env`).
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
from multiprocessing import forkserver

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(caller_pid: int) -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux; a no-op elsewhere); exits now if the
    caller (`caller_pid`) is already gone. The parent is the caller (spawn) or the fork server, which exits when
    the caller does. torch's spawn sets SIGINT as that signal, which a rank ignores when its command was started
    in the background by a script (`&` sets SIGINT to ignored, and children inherit it)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        os.kill(caller_pid, 0)
    except ProcessLookupError:  # the caller died before prctl took effect
        os._exit(1)


def release_fork_server() -> None:
    """Close this process's copy of the fork server's keep-alive pipe, if it is one of the server's children. The
    server exits when every holder of that pipe has closed it: the caller and each child it forked (passed so
    that a child could start processes through the server too). A rank holding it keeps the server alive after
    the caller dies, and so the parent-death signal that should end the rank never comes."""
    server = forkserver._forkserver
    fd = getattr(server, "_forkserver_alive_fd", None)
    if fd is not None:
        os.close(fd)
        server._forkserver_alive_fd = None


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn, args, env: dict, caller_pid: int) -> None:
    release_fork_server()
    die_with_parent(caller_pid)
    os.environ.clear()  # the caller's environment at the call (a fork server's children inherit the server's)
    os.environ.update({**env, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
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


FORKSERVER_PRELOAD = ["torch", "megatron.core.tensor_parallel", "verl_mega.trainer.ppo_trainer"]


def start_method(env: dict) -> str:
    """How ranks with environment `env` are started here: "forkserver", or "spawn" with CUDA or TRITON_INTERPRET
    (module docstring)."""
    return "spawn" if torch.cuda.is_available() or env.get("TRITON_INTERPRET") else "forkserver"


def run_distributed(fn, world_size: int, *args, timeout_s: float = 300.0, env: dict | None = None) -> list:
    """Call `fn(*args)` on `world_size` gloo ranks (also on a CUDA machine: the ranks outnumber its GPUs), each
    with this process's environment plus `env`; return the list of results by rank."""
    env = {**os.environ, "VERL_MEGA_DIST_TIMEOUT": "120", "VERL_MEGA_DIST_BACKEND": "gloo", **(env or {})}
    method = start_method(env)
    if method == "forkserver":
        mp.set_forkserver_preload(FORKSERVER_PRELOAD)  # read when the server starts (the first call)
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_worker, args=(world_size, free_port(), out_dir, fn, args, env, os.getpid()),
                                 nprocs=world_size, join=False, start_method=method)
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
