"""Processes a test started (ranks of a spawned run): are they still running, wait for them to end, clean up."""

import os
import signal
import time


def running(pid: int) -> bool:
    """Whether `pid` is still running: not gone and not a zombie (exited, not yet reaped; /proc state Z)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def still_running(pids, within_s: float = 10.0) -> list[int]:
    """The `pids` still running after waiting up to `within_s` seconds for all of them to end."""
    deadline = time.monotonic() + within_s
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if running(p)]


def kill_running(pids) -> None:
    """SIGKILL those of `pids` still running (a test's cleanup: no rank outlives it)."""
    for p in pids:
        if running(p):
            os.kill(p, signal.SIGKILL)
