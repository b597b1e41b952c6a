#!/usr/bin/env bash
# Launch any verl-mega command on one node with torchrun.
#   NPROC=8 launch/torchrun.sh train examples/configs/gsm8k_grpo.yaml parallel.tp=2 parallel.pp=2
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT on every node.
set -euo pipefail
: "${NPROC:=$(python3 -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}"
export VERL_MEGA_DIST_TIMEOUT="${VERL_MEGA_DIST_TIMEOUT:-600}"
exec torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --max_restarts 0 \
  -m verl_mega "$@"
