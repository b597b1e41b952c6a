#!/usr/bin/env bash
# All 2-GPU figures in one call (device tool, kind nvidia-h100-x2 / nvidia-h200-x2):
#   bash benchmarks/run_multi_gpu.sh          # results under $OUT (tarred: $OUT/multi_gpu.tar.gz)
# Each benchmark runs under its own time limit, so one failure does not cost the others.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 VERL_MEGA_DIST_TIMEOUT=300
RES=${OUT:-bench_out}/multi_gpu; mkdir -p "$RES"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$RES/gpus.txt" 2>&1
run() {  # run NAME LIMIT_S CMD...
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"; local t0=$(date +%s)
  OUT="$RES" timeout "$limit" "$@" > "$RES/$name.log" 2>&1; local rc=$?
  echo "=== $name rc=$rc in $(( $(date +%s) - t0 )) s"; tail -n 25 "$RES/$name.log"
}
TR="torchrun --nproc_per_node 2 --max_restarts 0"
run smoke_tp        90 $TR benchmarks/gpu_smoke_tp.py
run reshard        120 $TR benchmarks/reshard.py
run train          170 $TR benchmarks/train_throughput.py
run grpo_1gpu      110 python3 benchmarks/grpo_e2e.py --steps 3 --out "$RES/grpo1"
run grpo_2gpu      150 $TR benchmarks/grpo_e2e.py --layouts 2x1,1x2,1x1 --steps 3 --out "$RES/grpo2"
tar -czf "${OUT:-bench_out}/multi_gpu.tar.gz" -C "$(dirname "$RES")" multi_gpu
