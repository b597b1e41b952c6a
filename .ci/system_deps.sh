#!/usr/bin/env bash
# System (apt) packages the tests need; .ci/run calls this before installing Python packages.
# Idempotent: each block installs only what is missing. One block per subsystem.
set -euo pipefail

# --- sandbox (verl_mega/tools/sandbox.py): bubblewrap isolates, util-linux's prlimit sets the limits,
# the system python3 (under /usr, the only host tree the sandbox sees) runs the programs.
if ! command -v bwrap >/dev/null || [ ! -x /usr/bin/prlimit ] || [ ! -x /usr/bin/python3 ]; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends bubblewrap util-linux python3
fi
