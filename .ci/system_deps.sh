#!/usr/bin/env bash
# System (apt) packages the tests need; .ci/run calls this before installing Python packages.
# Idempotent: each block installs only what is missing. One block per subsystem.
set -euo pipefail

# --- sandbox (verl_mega/tools/sandbox.py): bubblewrap isolates, util-linux's prlimit sets the limits,
# coreutils' timeout is the backstop, the system python3 (under /usr, the only host tree the sandbox
# sees) runs the programs, python3-seccomp builds the seccomp filter.
if ! command -v bwrap >/dev/null || [ ! -x /usr/bin/prlimit ] || ! /usr/bin/python3 -c "import seccomp" 2>/dev/null; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends bubblewrap util-linux coreutils python3 python3-seccomp
fi
