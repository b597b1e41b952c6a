"""Shared by the sandbox tests: small limits, and a sandbox that fails (not skips) under CI without bubblewrap."""

import os

import pytest

from verl_mega.tools import Sandbox, SandboxLimits, SandboxUnavailable

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
