#!/usr/bin/env bash
# issue 14's A/B, each variant at its own auto budget (on an H200 the same as the shared one at these shapes)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
AB_OWN=1 AB_SHAPES=1.5b,0.5b AB_VARIANTS=padded,packed+compile AB_STEPS=4 AB_LOGPROB_TOKENS=auto BUDGET=560 \
  bash benchmarks/run_h200.sh grpo_e2e_ab_full
