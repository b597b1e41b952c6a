"""Shared by the sandbox tests: small limits, and a sandbox that fails (not skips) under CI without bubblewrap."""

import os
import time

import pytest

from verl_mega.tools import Sandbox, SandboxLimits, SandboxUnavailable
from verl_mega.tools.sandbox import NOBODY_UID

# Small limits keep every attack to a few seconds: the wall limit is what the slow attacks (loop, fork bomb) cost.
SMALL = SandboxLimits(
    timeout_s=2.0, memory_mb=256, max_processes=16, max_file_mb=1, tmp_mb=8, max_open_files=64, max_output_bytes=64 << 10
)


def make_sandbox(limits: SandboxLimits = SMALL) -> Sandbox:
    """A Sandbox, or a skip (a failure when CI=true: CI must install bubblewrap via .ci/system_deps.sh)."""
    try:
        return Sandbox(limits)
    except SandboxUnavailable as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must provide the sandbox: {e}")
        pytest.skip(str(e))


def sandbox_processes() -> list[int]:
    """Host pids owned by the sandbox uid (timeout, bwrap and everything under them), zombies excluded.

    Meaningful when the tests run as root (as CI does): the sandboxes then run as `nobody`.
    """
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    status = f.read()
            except OSError:
                continue
            uid = int(status.split("Uid:")[1].split()[0])
            if uid == NOBODY_UID and "\nState:\tZ" not in status:
                pids.append(int(entry))
    return pids


def assert_no_leftovers(within_s: float = 5.0) -> None:
    """No sandbox process is left after `within_s` seconds."""
    deadline = time.monotonic() + within_s
    while (left := sandbox_processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"sandbox processes still running: {left}"
