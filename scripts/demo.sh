#!/usr/bin/env bash
# The README's main job: install from scratch (CPU), then run the RL demo.
# Usage: bash scripts/demo.sh [verl-mega demo args...]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0          # CPU build from local disk; must come before the package
python3 -m pip install -q -e .
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false
exec verl-mega demo "$@"
