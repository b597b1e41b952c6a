#!/usr/bin/env bash
# System packages the tests drive (idempotent: installs only what is missing; needs root or sudo).
#   slurm-wlm, munge: tests/launch (a real SLURM cluster on this host runs launch/slurm.sbatch)
set -euo pipefail
packages=(slurm-wlm munge)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if (( ${#missing[@]} )); then
  sudo=""; if (( EUID != 0 )); then sudo="sudo"; fi
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${missing[@]}"
fi
