#!/usr/bin/env bash
# System (apt) packages the tests need; .ci/run calls this before installing Python packages.
# Idempotent: installs only what is missing (needs root or sudo).
#   bubblewrap, util-linux (prlimit), coreutils (timeout), python3 (the sandbox's interpreter under /usr),
#   python3-seccomp (the seccomp filter): verl_mega/tools/sandbox.py, tests/tools
#   slurm-wlm, munge: tests/launch (a real SLURM cluster on this host runs launch/slurm.sbatch)
set -euo pipefail
packages=(bubblewrap util-linux coreutils python3 python3-seccomp slurm-wlm munge)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if (( ${#missing[@]} )); then
  sudo=""; if (( EUID != 0 )); then sudo="sudo"; fi
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
fi
