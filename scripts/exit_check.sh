#!/usr/bin/env bash
# Exit-status check of a successful distributed run: `torchrun --nproc-per-node 2 -m verl_mega generate --tp 2`
# on a tiny random model, N times; prints how many runs exited non-zero (a gloo process group left alive at
# interpreter exit used to abort with "terminate called without an active exception", exit -6 / 134).
# Usage: bash scripts/exit_check.sh [N=30] [WORK_DIR]; exits 1 if any run failed. Run from anywhere; uses the
# verl_mega that `python3` imports (set PYTHONPATH to test a checkout).
set -uo pipefail
N="${1:-30}"
WORK="${2:-$(mktemp -d)}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false
export VERL_MEGA_DIST_TIMEOUT="${VERL_MEGA_DIST_TIMEOUT:-120}"
mkdir -p "$WORK"
python3 - "$WORK" <<'PY' || exit 2
import json, os, sys
from verl_mega.testing.tiny_hf import make_tiny_hf_model
work = sys.argv[1]
if not os.path.exists(os.path.join(work, "model", "config.json")):
    make_tiny_hf_model(os.path.join(work, "model"), arch="qwen2", vocab_size=130, seed=3)
with open(os.path.join(work, "prompts.jsonl"), "w") as f:
    f.writelines(json.dumps({"prompt": p}) + "\n" for p in ["1+1=", "hello", "abc", "The cat"])
PY
failed=0
for i in $(seq 1 "$N"); do
    rm -f "$WORK/out.jsonl"
    python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m verl_mega generate --model "$WORK/model" \
        --prompts "$WORK/prompts.jsonl" --out "$WORK/out.jsonl" --tp 2 --max-new-tokens 8 --temperature 0 \
        > "$WORK/run.log" 2>&1
    rc=$?
    if [ "$rc" -ne 0 ] || [ ! -s "$WORK/out.jsonl" ]; then
        failed=$((failed + 1))
        echo "run $i: exit $rc" >&2
        tail -5 "$WORK/run.log" >&2
    fi
done
echo "exit_check: $failed of $N runs failed"
[ "$failed" -eq 0 ]
