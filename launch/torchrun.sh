#!/usr/bin/env bash
# Launch any verl-mega command with torchrun, on one node or many (c10d rendezvous).
#
#   One node, 8 GPUs:   launch/torchrun.sh train examples/configs/gsm8k_grpo.yaml parallel.tp=2
#   Two nodes: on each node, with the same MASTER_ADDR (a host of node 0) and RDZV_ID,
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh train cfg.yaml   # on node0
#     NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh train cfg.yaml   # on node1
#   Print the resolved command and exit:  launch/torchrun.sh --dry-run train cfg.yaml
#
# Environment (default):
#   NNODES (1)                number of nodes (torchrun agents) that must join before training starts
#   NODE_RANK (0)             0 on the node that hosts the rendezvous store (its address is MASTER_ADDR);
#                             the global rank order is then assigned by the c10d rendezvous
#   NPROC_PER_NODE            processes per node (default: the visible GPU count, 1 without GPUs)
#   MASTER_ADDR (127.0.0.1)   rendezvous host: an address of node 0 reachable from every node
#   MASTER_PORT (29500)       rendezvous port on MASTER_ADDR
#   RDZV_ID (verl-mega)       rendezvous id: the same on every node of one job, unique per job
#   VERL_MEGA_DIST_TIMEOUT (600)  seconds a collective waits for a peer before the job fails
#   PYTHON (python3)          interpreter that runs torch.distributed.run
#
# Failure: --max-restarts 0. A rank that dies (or raises) ends its node's agent with a non-zero exit and
# a "Root Cause" summary naming the rank; the other nodes' ranks fail at their next collective (at once
# when the peer's sockets close, at the latest after VERL_MEGA_DIST_TIMEOUT) and their agents exit non-zero.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
: "${PYTHON:=python3}"
: "${NPROC_PER_NODE:=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
: "${NNODES:=1}" "${NODE_RANK:=0}" "${MASTER_ADDR:=127.0.0.1}" "${MASTER_PORT:=29500}" "${RDZV_ID:=verl-mega}"
export VERL_MEGA_DIST_TIMEOUT="${VERL_MEGA_DIST_TIMEOUT:-600}"
if [[ "$NODE_RANK" == 0 ]]; then is_host=1; else is_host=0; fi

cmd=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE"
     --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID"
     --rdzv-conf "is_host=$is_host" --max-restarts 0 -m verl_mega "$@")
if (( dry_run )); then
  echo "NODE_RANK=$NODE_RANK VERL_MEGA_DIST_TIMEOUT=$VERL_MEGA_DIST_TIMEOUT ${cmd[*]}"
  exit 0
fi
# one line per node first (stderr): which node ran what, in the node's log even when its ranks print nothing
echo "verl-mega: node $NODE_RANK of $NNODES, $NPROC_PER_NODE processes: ${cmd[*]}" >&2
exec "${cmd[@]}"
