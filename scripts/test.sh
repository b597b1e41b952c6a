#!/usr/bin/env bash
# The test command (README): every test, CPU only, gloo for the distributed ones.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false PYTHONWARNINGS="ignore::UserWarning"
exec python3 -m pytest -q --timeout=600 -p no:cacheprovider tests "$@"
