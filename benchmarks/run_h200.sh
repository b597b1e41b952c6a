#!/usr/bin/env bash
# The owed GPU figures in two device calls on one H200 (at most 10 minutes each): `bash benchmarks/run_h200.sh`
# (plan "core", below) and `bash benchmarks/run_h200.sh models` (plan "models": the VLM GRPO step at the
# Qwen2.5-VL-3B shape with the vision tower's share, the tower's share per phase, reward-model / judge rewards,
# the multi-turn agent rollout). Plan "core", in priority order:
#   1. GPU kernel tests (pytest tests/kernels) and the demo on CUDA (verl_mega demo --quick --nproc 1 --tp 1)
#   2. rollout_service.py at the Qwen2.5-0.5B shape: continuous batching vs the static engine
#   3. throughput.py 0.5B + 1.5B, 8x8, prompt 128, 256 new tokens, KL off; then trl_grpo.py 0.5B (the ratio)
#   4. grpo_e2e.py --ab 0.5b: packed vs padded
#   5. the 7B offload run (grpo_e2e.py --shape 7b --offload-optimizer --offload-grads), with what time is left
# Each step has its own `timeout`, capped by what is left of BUDGET seconds (default 560: the call's 600 s
# minus the wheel install and the copy-back); a step that would get under 30 s is skipped and says so.
# Run from the repository root with `.whl/` carried (benchmarks/README.md, "Wheels for the GPU machine"):
#   device tool: command "bash benchmarks/run_h200.sh", carry [".whl"], kind nvidia-h200, timeout_s 600
# Writes at most 8 files under $OUT: summary.md (step table + every markdown table), logs.txt (all logs),
# steps.json (rc and seconds per step), rollout_service.json, throughput.json (TRL peer included),
# trl_grpo.json, grpo_e2e_ab.json, offload_7b.json (step 5's grpo_e2e.json, when it finished).
set -u
OUT=${OUT:?set OUT (the device tool does)}
PLAN=${1:-core}
[[ $PLAN == core || $PLAN == models ]] || { echo "plan must be core or models, got $PLAN"; exit 2; }
BUDGET=${BUDGET:-560}
START=$(date +%s)
WORK=$(mktemp -d /tmp/h200.XXXX)  # scripts write here; the chosen files are copied to $OUT after every step

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false || { echo "wheel install failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$WORK/gpu.txt" 2>&1

STEPS="$WORK/steps.tsv"
: > "$STEPS"

step() {  # step NAME CAP_SECONDS COMMAND...: run with timeout min(CAP, left - 10), log to $WORK/NAME.log
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) - 10 ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 30 )); then
    printf '%s\tskipped\t0\t(%s s left)\n' "$name" "$left" >> "$STEPS"; echo "== $name skipped ($left s left)"; return
  fi
  echo "== $name (timeout $limit s): $*"
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$*" >> "$STEPS"
  echo "   rc=$rc after $(( $(date +%s) - t0 )) s"; tail -n 3 "$WORK/$name.log"
  collect
}

collect() {  # combine what exists into the <= 8 files under $OUT
  python3 - "$WORK" "$OUT" "$BUDGET" "$PLAN" <<'PY'
import glob, json, os, shutil, sys
work, out, budget, plan = sys.argv[1:5]
steps = [line.rstrip("\n").split("\t") for line in open(os.path.join(work, "steps.tsv"))]
json.dump([{"step": s[0], "rc": s[1], "seconds": int(s[2]), "command": s[3]} for s in steps],
          open(os.path.join(out, "steps.json"), "w"), indent=1)
gpu = open(os.path.join(work, "gpu.txt")).read().strip() if os.path.exists(os.path.join(work, "gpu.txt")) else "?"
md = [f"# benchmarks/run_h200.sh {plan} on {gpu} (budget {budget} s)", "", "| step | rc | seconds | command |",
      "|---|---|---|---|"] + [f"| {s[0]} | {s[1]} | {s[2]} | `{s[3]}` |" for s in steps]
tp, trl = (os.path.join(work, d, f) for d, f in (("throughput", "throughput.json"), ("trl", "trl_grpo.json")))
if os.path.exists(tp) and os.path.exists(trl):  # throughput.py's peer_ratios rule: same shape and batch, KL off
    ours, peer = json.load(open(tp)), json.load(open(trl))
    a = peer["args"]
    md += [""] + [f"- {r['name']} / {peer['framework']}: **{r['tokens_per_s_per_gpu'] / peer['tokens_per_s_per_gpu']:.2f}x**"
                  f" tokens/s/GPU ({r['tokens_per_s_per_gpu']:.0f} vs {peer['tokens_per_s_per_gpu']:.0f})"
                  for r in ours["results"] if (r["config"]["shape"], r["config"]["prompts"], r["config"]["n"],
                                               r["config"]["kl"]) == (a["shape"], a["prompts"], a["n"], False)]
for name in ("throughput.md", "grpo_e2e_ab.md", "grpo_e2e.md", "reward_models.md"):
    for path in glob.glob(os.path.join(work, "**", name), recursive=True):
        md += ["", open(path).read()]
open(os.path.join(out, "summary.md"), "w").write("\n".join(md) + "\n")
with open(os.path.join(out, "logs.txt"), "w") as f:
    for s in steps:
        log = os.path.join(work, s[0] + ".log")
        if os.path.exists(log):
            text = open(log, errors="replace").read()
            f.write(f"\n===== {s[0]} (rc {s[1]}, {s[2]} s)\n" + (text[-40000:] if len(text) > 40000 else text))
for name in ("rollout_service.json", "throughput.json", "trl_grpo.json", "grpo_e2e_ab.json", "vlm_gpu_check.json",
             "vlm_grpo_step.json", "vlm_vision_share.json", "reward_models.json", "agent_rollout.json"):  # <= 5 per plan
    for path in glob.glob(os.path.join(work, "**", name), recursive=True):
        shutil.copy(path, os.path.join(out, name))
if os.path.exists(os.path.join(work, "offload", "grpo_e2e.json")):
    shutil.copy(os.path.join(work, "offload", "grpo_e2e.json"), os.path.join(out, "offload_7b.json"))
PY
}

if [[ $PLAN == models ]]; then
  # issue 17: the VLM on CUDA first (bf16 vs transformers, greedy eager == CUDA graph == transformers, no host sync in
  # decode), then one GRPO step at the Qwen2.5-VL-3B shape (16 prompts x 8, one 448x448 image each), vision share
  step vlm_gpu_check 90 python3 benchmarks/vlm_gpu_check.py --out "$WORK/vlm_check"
  step vlm_grpo_step 200 python3 benchmarks/vlm_grpo_step.py --prompts 16 --n 8 --image 448 --steps 2 --out "$WORK/vlm"
  step vlm_vision_share 100 python3 benchmarks/vlm_vision_share.py --out "$WORK/vlm_share"
  # issue 19: rule vs reward model vs LLM judge rewards (with and without offload) inside a GRPO step
  step reward_models 200 python3 benchmarks/reward_models.py --rewards rule,model,model_offload,judge,judge_offload \
    --out "$WORK/rewards"
  # issue 16: multi-turn agent rollout, tool calls overlapping generation vs serial
  mkdir -p "$WORK/agent"
  step agent_rollout 120 python3 benchmarks/agent_rollout.py --out "$WORK/agent/agent_rollout.json"
  collect
  echo "done after $(( $(date +%s) - START )) s"; cat "$OUT/summary.md"; exit 0
fi

# 1. kernel tests and the CUDA demo
step kernels_tests 120 python3 -m pytest -q -x tests/kernels
step demo 120 python3 -m verl_mega demo --quick --nproc 1 --tp 1 --output-dir "$WORK/demo"
# 2. continuous vs static at the 0.5B shape (no transformers baseline, no GRPO step: the budget)
step rollout_service 150 python3 benchmarks/rollout_service.py --shapes qwen2.5-0.5b --no-hf --grpo-shape '' \
  --out-dir "$WORK/rollout"
# 3. end-to-end GRPO throughput, then the TRL peer (collect puts the tokens/s ratio into summary.md)
step throughput 200 python3 benchmarks/throughput.py --shapes 0.5b,1.5b --batches 8x8 --prompt-len 128 \
  --new-tokens 256 --kl off --out "$WORK/throughput"
step trl_grpo 150 python3 benchmarks/trl_grpo.py --shape 0.5b --out "$WORK/trl"
# 4. packed vs padded at 0.5B (forced lengths 32..256 during generation)
step grpo_e2e_ab 180 python3 benchmarks/grpo_e2e.py --ab 0.5b --variants padded,packed --prompts 64 --n 8 \
  --prompt-len 128 --response-len 32:256 --max-new-tokens 256 --max-tokens 16384 --steps 3 --out "$WORK/ab"
# 5. the 7B offload run (issue 15: optimizer masters + Adam on the host, training state off the GPU in rollout)
step offload_7b 600 python3 benchmarks/grpo_e2e.py --shape 7b --offload-optimizer --offload-grads --prompts 16 --n 8 \
  --prompt-len 512 --response-len 32:1024 --max-new-tokens 1024 --micro-batch 4 --steps 2 --out "$WORK/offload"
collect
echo "done after $(( $(date +%s) - START )) s"; cat "$OUT/summary.md"
