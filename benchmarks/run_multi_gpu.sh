#!/usr/bin/env bash
# Issue 20's figures on one multi-GPU machine (device tool, kind nvidia-h100-x2/-x4/-x8 or nvidia-h200-x*), one call
# (at most 10 minutes) per invocation; the baseline of every comparison runs in the same call:
#   bash benchmarks/run_multi_gpu.sh STEP [STEP ...]      (carry [".whl"], as run_h200.sh)
# Steps (N = the GPUs of the machine):
#   smoke_tp    tp=2 vs tp=1 logits of one HF checkpoint on NCCL (gpu_smoke_tp.py)
#   parity      first-step loss of every TPxPP layout on N GPUs against tp=pp=dp=1 (bf16 and fp32 on one GPU),
#               1.5B shape (layout_parity.py; SHAPE= to change it); the bf16 tolerance is stated in that script
#   reshard     HybridEngine tp -> tp_g=1 for tp = 2, 4, .. N and pp = 2 -> 1, shapes 1.5B, 7B, 8B (reshard.py: time
#               vs one plain all-gather of the same bytes, bytes moved vs HybridFlow's analytic volume, peak memory)
#   scaling     throughput.py at 1, 2, 4, .. N GPUs (same global batch, BATCH=64x8, shapes SHAPES=0.5b,1.5b,
#               tp=pp=1: dp = GPUs), then scaling.py: tokens/s/GPU and strong-scaling efficiency, table + PNG
#   layouts_7b  throughput.py at the 7B shape with a reference model (KL on) over the TPxPP layouts LAYOUTS_7B
#               (default 1x1,2x1,4x1,2x2 where they divide N); 8b (Llama-3.1-8B shape) for NeMo-RL's 1,496
#               tokens/s/GPU: SHAPES_7B=7b,8b
# Environment: BUDGET (seconds, default 570), SHAPE, SHAPES, BATCH, LAYOUTS_7B, SHAPES_7B.
# Writes under $OUT (<= 8 files; rewritten after every step): summary.md (step table + every markdown table),
# logs.txt, results.json (every JSON report keyed by its path), scaling.png.
set -u
OUT=${OUT:?set OUT (the device tool does)}
BUDGET=${BUDGET:-570}
SHAPE=${SHAPE:-1.5b}
SHAPES=${SHAPES:-0.5b,1.5b}
BATCH=${BATCH:-64x8}
SHAPES_7B=${SHAPES_7B:-7b}
[[ $# -gt 0 ]] || { echo "name the steps: smoke_tp parity reshard scaling layouts_7b"; exit 2; }

source benchmarks/device_steps.sh  # wheels, WORK, step()
# NVLink multicast off (see the device tool's KINDS.md); collective waits time out instead of hanging
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 VERL_MEGA_DIST_TIMEOUT=300
N=$(nvidia-smi -L | wc -l)
POWERS=""; for n in 1 2 4 8 16; do (( n <= N )) && POWERS="$POWERS $n"; done  # GPU counts of the scaling step
TR="torchrun --standalone --max-restarts 0 --nproc-per-node"  # word-split on purpose: $TR N script ...

collect() {  # the <= 8 files under $OUT
  python3 - "$WORK" "$OUT" <<'PY'
import glob, json, os, shutil, sys
work, out = sys.argv[1:3]
steps = [line.rstrip("\n").split("\t") for line in open(os.path.join(work, "steps.tsv"))]
gpu = open(os.path.join(work, "gpu.txt")).read().strip().splitlines()
md = [f"# benchmarks/run_multi_gpu.sh on {len(gpu)} x {gpu[0] if gpu else '?'}", "", "| step | rc | seconds | command |",
      "|---|---|---|---|"] + [f"| {s[0]} | {s[1]} | {s[2]} | `{s[3]}` |" for s in steps]
for path in sorted(glob.glob(os.path.join(work, "**", "*.md"), recursive=True)):
    md += ["", f"<!-- from {os.path.relpath(path, work)} -->", open(path).read()]
open(os.path.join(out, "summary.md"), "w").write("\n".join(md) + "\n")
with open(os.path.join(out, "logs.txt"), "w") as f:
    for s in steps:
        log = os.path.join(work, s[0] + ".log")
        if os.path.exists(log):
            f.write(f"\n===== {s[0]} (rc {s[1]}, {s[2]} s)\n" + open(log, errors="replace").read()[-30000:])
results = {os.path.relpath(p, work): json.load(open(p)) for p in glob.glob(os.path.join(work, "**", "*.json"),
                                                                          recursive=True)}
json.dump(results, open(os.path.join(out, "results.json"), "w"), indent=1)
for png in glob.glob(os.path.join(work, "scaling", "scaling.png")):
    shutil.copy(png, os.path.join(out, "scaling.png"))
PY
}

run_step() {
  case $1 in
    smoke_tp) mkdir -p "$WORK/smoke_tp"; step smoke_tp 90 env OUT="$WORK/smoke_tp" $TR 2 benchmarks/gpu_smoke_tp.py ;;
    parity)
      step parity_reference 150 python3 benchmarks/layout_parity.py --shape "$SHAPE" --out "$WORK/parity_ref"
      step parity 240 $TR "$N" benchmarks/layout_parity.py --shape "$SHAPE" --layouts all \
        --reference "$WORK/parity_ref/layout_parity.json" --out "$WORK/parity" ;;
    reshard) local tps=""; for n in $POWERS; do (( n > 1 )) && tps="$tps,$n"; done
      mkdir -p "$WORK/reshard"
      step reshard 300 env OUT="$WORK/reshard" $TR "$N" benchmarks/reshard.py --tps "${tps#,}" --pps 2 --models 1.5B,7B,8B ;;
    scaling) local reports=""
      for n in $POWERS; do
        step "scaling_$n" 150 $TR "$n" benchmarks/throughput.py --shapes "$SHAPES" --batches "$BATCH" --kl off \
          --out "$WORK/scaling_runs/$n"
        reports="$reports $WORK/scaling_runs/$n/throughput.json"
      done
      step scaling 60 python3 benchmarks/scaling.py $reports --out "$WORK/scaling" ;;
    layouts_7b) local layouts=${LAYOUTS_7B:-}
      if [[ -z $layouts ]]; then for l in 1x1 2x1 4x1 2x2; do
        (( N % (${l%x*} * ${l#*x}) == 0 )) && layouts="$layouts,$l"; done; layouts=${layouts#,}; fi
      step layouts_7b 540 $TR "$N" benchmarks/throughput.py --shapes "$SHAPES_7B" --batches "$BATCH" --kl on \
        --layouts "$layouts" --out "$WORK/layouts_7b" ;;
    *) echo "unknown step: $1 (steps: smoke_tp parity reshard scaling layouts_7b)"; exit 2 ;;
  esac
}

for name in "$@"; do run_step "$name"; done
collect
echo "done after $(( $(date +%s) - START )) s"; cat "$OUT/summary.md"
