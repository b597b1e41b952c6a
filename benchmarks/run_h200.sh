#!/usr/bin/env bash
# The owed GPU figures on one H200 (or H100), one device call (at most 10 minutes) per invocation:
#   bash benchmarks/run_h200.sh [PLAN_OR_STEP ...]      (default: core)
# Plans: "core" and "models" = the CORE and MODELS lists below (far more than one call's 10 minutes: name steps);
# "all" = core then models.
# Steps can also be named one by one, in the order to run them (e.g. after a fix, only the steps that failed):
#   kernels_tests    pytest tests/kernels on CUDA (the compiled Triton kernels)
#   demo             the main job on CUDA: verl_mega demo --quick --nproc 1 --tp 1 (issue 12)
#   rollout_service  continuous batching vs the static engine at the Qwen2.5-0.5B shape, + a torch.profiler call (issue 13)
#   rollout_fast     rollout_service without the profiler call
#   attention_sweep  the paged decode-attention kernel alone per launch setting (warps, stages, context splits) at
#                    ROLLOUT_SHAPES' heads, 16-512 rows (rollout_service.py --attention-sweep)
#   paged_tests      pytest test_paged_attention.py + test_fused_sampling.py + test_fused_ops.py +
#                    test_decode_windows.py on CUDA (the paged kernel in fp32 and bf16, the one-pass sampler, the
#                    decoder's fused ops and the RoPE kernel's KV-cache write, a decode window as one CUDA graph), and
#                    test_trainer.py's deleted-trainer test (the freed models, CUDA graphs included)
#   reward_overlap   a 0.5B GRPO step with a 50 ms-per-response reward, streamed vs after generation (issue 13)
#   throughput       GRPO tokens/s/GPU, 0.5B + 1.5B, 8x8, prompt 128, 256 new tokens, KL off (issue 18)
#   trl_grpo         the TRL peer on the 0.5B row (summary.md gets the tokens/s ratio; issue 18)
#   profile_8x8      where throughput's 0.5B 8x8 step goes: one profiled step (per stage, per kernel), and the
#                    rollout engine alone on its 64 rows x 256 tokens under the profiler (issue 18)
#   grpo_e2e_ab      packed vs padded micro-batches (and packed with model.compile) at 0.5B, lengths 32..256 forced
#                    (issue 14)
#   padded_width     a padded micro-batch's forward + backward at widths 1148..1168 (0.5B shape, 16 rows), the attention
#                    bias aligned (the decoder's) and plain, under SDPA's choice and the efficient / cuDNN backends
#                    forced: does the width's alignment set the padded step's time (results/h100_2026-12-07d)? (issue 14)
#   grpo_e2e_ab_full issue 14's A/B as filed: 0.5B and 1.5B, lengths 32..1024, padded / packed + model.compile /
#                    the same + full recompute (peak memory with and without recompute); a whole call
#   profile_update   where the packed + compiled update's time goes at issue 14's workload (64 x 8, lengths 32..1024,
#                    PROFILE_SHAPE, default 1.5b): one measured step after two warm-ups (the compiled run's extra
#                    one included), then one profiled step: per stage and per kernel, and each stage's GPU idle
#                    time by cause (benchmarks/profile_gaps.py; grpo_e2e_profile.txt in summary.md; issue 14)
#   graph_reuse      issue 14's packed + compiled 1.5B step four ways: the KV cache freed after each rollout with the
#                    CUDA graphs kept (the default), freed with it and recaptured every rollout (--recapture: main
#                    before session 17), the cache kept too (--keep-cache), and the default with decode windows
#                    as one graph each (--graph-window on)
#   trainer_auto     the trainer's own `auto` token budgets (packed, throughput.py --micro-batch tokens-auto) at issue
#                    14's workload with KL on (so a forward-only reference pass), TRAINER_AUTO_SHAPES (default 1.5B
#                    then 0.5B), compiled layers:
#                    the budgets it picks and its planned peak against the measured one
#   packed           grpo_e2e_ab's packed 0.5B run alone (the current tree's side of pre_offload's comparison)
#   pre_offload      grpo_e2e_ab's packed 0.5B run on the tree before offload landed (5416edb, carried as .old/:
#                    `mkdir .old && git archive 5416edb | tar -x -C .old`): issue 15 item 4, same call
#   offload_7b       the 7B run with optimizer + gradient offload and full recompute (issue 15; without recompute it
#                    plans 95.7 GiB: an H200 only)
#   sampler_sizes    the one-pass sampler over decode batch sizes (compiles met, us per call) against a baseline copy of
#                    fused_sampling.py carried as .old/fused_sampling.py (`git show REV:verl_mega/rollout/fused_sampling.py`)
#   vlm_gpu_check    the VLM in bf16 vs transformers, CUDA-graph greedy, no host sync in decode (issue 17)
#   vlm_grpo_step    one GRPO step at the Qwen2.5-VL-3B shape, 16 prompts x 8, one 448x448 image each (issue 17)
#   vlm_vision_share the vision tower's share per phase (issue 17)
#   reward_models    rule vs reward model vs LLM judge rewards inside a GRPO step, with/without offload (issue 19)
#   reward_judge     reward_models' judge run only (2 steps after the warm-up)
#   agent_rollout    multi-turn agent rollout (8 prompts x 8), tool calls overlapping generation vs serial (issue 16)
# Environment: BUDGET (seconds, below), MICRO_BATCH / TRL_MICRO_BATCH (throughput / trl_grpo sequences per forward-
# backward; throughput default auto, TRL default 64, its pick at 0.5B on 80 GB), COMPILE (throughput: off | on | off,on,
# default off,on), ATTENTION (auto |
# gather | paged: the engine's decode attention in throughput and grpo_e2e_ab; auto = paged on CUDA), ROLLOUT_SHAPES (comma-separated, default qwen2.5-0.5b), ROLLOUT_VARIANTS
# (rollout_service / rollout_fast: the new engine's variants, default all of rollout_service.py's VARIANTS), ROLLOUT_HF
# (rollout_fast: any non-empty value, e.g. 1, times transformers' generate as well), AB_SHAPES / AB_VARIANTS / AB_STEPS /
# AB_MAX_TOKENS / AB_LOGPROB_TOKENS / AB_OWN (grpo_e2e_ab_full, below).
# Each step has its own `timeout`, capped by what is left of BUDGET seconds (default 560: the call's 600 s
# minus the wheel install and the copy-back); a step that would get under 30 s is skipped and says so.
# Run from the repository root with `.whl/` carried (benchmarks/README.md, "Wheels for the GPU machine"):
#   device tool: command "bash benchmarks/run_h200.sh core", carry [".whl"], kind nvidia-h200, timeout_s 600
# Writes 4 files under $OUT (5 with throughput.png), rewritten after every step (a time-out keeps what finished): summary.md (step
# table + every markdown table + the TRL ratio), logs.txt (all logs), steps.json (rc and seconds per step),
# results.json (every step's JSON report, keyed by its path under the work folder, e.g. rollout/rollout_service.json;
# the grpo_e2e.py runs' as offload_7b.json, pre_offload_0p5b.json, graph_reuse_*.json).
set -u
OUT=${OUT:?set OUT (the device tool does)}
CORE="kernels_tests paged_tests demo rollout_service rollout_fast attention_sweep reward_overlap throughput trl_grpo profile_8x8 grpo_e2e_ab padded_width grpo_e2e_ab_full profile_update graph_reuse trainer_auto packed pre_offload offload_7b sampler_sizes"
MODELS="vlm_gpu_check vlm_grpo_step vlm_vision_share reward_models reward_judge agent_rollout"
PLAN=""
for arg in "${@:-core}"; do
  case $arg in
    core) PLAN="$PLAN $CORE" ;; models) PLAN="$PLAN $MODELS" ;; all) PLAN="$PLAN $CORE $MODELS" ;;
    *) [[ " $CORE $MODELS " == *" $arg "* ]] || { echo "unknown plan or step: $arg (plans: core models all; steps: $CORE $MODELS)"; exit 2; }
       PLAN="$PLAN $arg" ;;
  esac
done
BUDGET=${BUDGET:-560}
ATTENTION=${ATTENTION:-auto}  # the rollout engine's decode attention in throughput / grpo_e2e_ab (auto | gather | paged)
ROLLOUT_VARIANTS=${ROLLOUT_VARIANTS:-}  # rollout_service.py --variants ("" = all)
ROLLOUT_HF=${ROLLOUT_HF:-}  # rollout_fast: any non-empty value times transformers' generate too
HF_FLAG=--no-hf; [[ -n $ROLLOUT_HF ]] && HF_FLAG=--hf
MICRO_BATCH=${MICRO_BATCH:-auto}  # throughput.py --micro-batch (a sequence count or auto: the memory plan's largest)
TRL_MICRO_BATCH=${TRL_MICRO_BATCH:-64}  # trl_grpo.py --micro-batch (per_device_train_batch_size; 64 = auto's 0.5B pick)
COMPILE=${COMPILE:-off,on}  # throughput.py --compile: off, on or off,on (model.compile, torch.compile'd training layers)
TRAINER_AUTO_SHAPES=${TRAINER_AUTO_SHAPES:-1.5b,0.5b}  # trainer_auto's shapes in run order
ROLLOUT_SHAPES=${ROLLOUT_SHAPES:-qwen2.5-0.5b}  # rollout_service / rollout_fast shapes (issue 13: add qwen2.5-7b)
source benchmarks/device_steps.sh  # wheels, WORK, step()
# grpo_e2e_ab_full / profile_update's tokens per packed micro-batch (padded: that / 1024 sequences). auto: grpo_e2e.py
# --max-tokens auto, per shape the largest of the trainer's auto candidates (memory_plan.AUTO_TOKEN_BUDGETS, not below
# one sequence) whose memory plans (of the variants that run) fit 80% of the card (on an H100, each variant alone,
# AB_OWN=1: padded 16384 at 0.5B and 4096 at 1.5B, packed + compile 32768 and 8192; results/h100_2026-12-07f)
AB_MAX_TOKENS=${AB_MAX_TOKENS:-auto}
AB_SHAPES=${AB_SHAPES:-0.5b,1.5b}  # grpo_e2e_ab_full's shapes in run order (each variant's JSON line is in the log)
AB_VARIANTS=${AB_VARIANTS:-padded,packed+compile,packed+compile+full}  # grpo_e2e_ab_full's variants in run order (a name may end in @N, e.g. padded@128: trainer.pad_to_multiple_of=N)
AB_LOGPROB_TOKENS=${AB_LOGPROB_TOKENS:-}  # grpo_e2e's --logprob-max-tokens (auto or a count; empty: the training size)
AB_OWN=${AB_OWN:-}  # grpo_e2e_ab_full: any non-empty value gives each variant its own auto budget (--ab-budget own)
AB_STEPS=${AB_STEPS:-4}  # grpo_e2e_ab_full's --steps: 1 warm-up (+1 if a variant compiles, for all) + AB_STEPS - 1 measured (3 measured: padded 1.5B steps took 25.0-31.1 s)
PROFILE_SHAPE=${PROFILE_SHAPE:-1.5b}  # profile_update's model shape
if [[ $AB_MAX_TOKENS == auto ]]; then
  AB_BUDGET=(--max-tokens auto)
elif [[ $AB_MAX_TOKENS =~ ^[0-9]+$ ]] && (( AB_MAX_TOKENS >= 1024 )); then
  AB_BUDGET=(--max-tokens "$AB_MAX_TOKENS" --micro-batch $(( AB_MAX_TOKENS / 1024 )))
else
  echo "AB_MAX_TOKENS=$AB_MAX_TOKENS: need auto or a token count >= 1024 (one padded sequence per 1024 tokens)"; exit 2
fi

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
                  f" tokens/s/GPU ({r['tokens_per_s_per_gpu']:.0f} vs {peer['tokens_per_s_per_gpu']:.0f}; micro-batch"
                  f" {r.get('micro_batch', '?')} vs {a['micro_batch']})"
                  for r in ours["results"] if (r["config"]["shape"], r["config"]["prompts"], r["config"]["n"],
                                               r["config"]["kl"]) == (a["shape"], a["prompts"], a["n"], False)]
for name in ("throughput.md", "grpo_e2e_ab.md", "sampler_sizes.md", "attention_sweep.md", "padded_width.md", "grpo_e2e.md", "reward_models.md", "rollout_profile_*.txt",
             "profile_*.txt", "grpo_e2e_profile.txt"):
    for path in sorted(glob.glob(os.path.join(work, "**", name), recursive=True)):
        md += ["", f"<!-- from {os.path.relpath(path, work)} -->", open(path).read()]  # which step wrote it
open(os.path.join(out, "summary.md"), "w").write("\n".join(md) + "\n")
with open(os.path.join(out, "logs.txt"), "w") as f:
    for s in steps:
        log = os.path.join(work, s[0] + ".log")
        if os.path.exists(log):
            text = open(log, errors="replace").read()
            f.write(f"\n===== {s[0]} (rc {s[1]}, {s[2]} s)\n" + (text[-40000:] if len(text) > 40000 else text))
results = {}  # every step's JSON report in one file (the device tool brings back at most 8 files)
for name in ("rollout_service.json", "throughput.json", "trl_grpo.json", "grpo_e2e_ab.json", "padded_width.json", "vlm_gpu_check.json",
             "vlm_grpo_step.json", "vlm_vision_share.json", "reward_models.json", "agent_rollout.json"):
    for path in glob.glob(os.path.join(work, "**", name), recursive=True):
        results[os.path.relpath(path, work)] = json.load(open(path))  # e.g. "rollout/rollout_service.json"
for folder, key in (("offload", "offload_7b.json"), ("pre_offload", "pre_offload_0p5b.json"),
                    ("packed", "packed_0p5b.json"),
                    ("graph_reuse_kept", "graph_reuse_kept.json"),
                    ("graph_reuse_recapture", "graph_reuse_recapture.json"),
                    ("graph_reuse_keep_cache", "graph_reuse_keep_cache.json"),
                    ("graph_reuse_window", "graph_reuse_window.json"),
                    ("profile_update", "profile_update.json")):
    if os.path.exists(os.path.join(work, folder, "grpo_e2e.json")):
        results[key] = json.load(open(os.path.join(work, folder, "grpo_e2e.json")))
json.dump(results, open(os.path.join(out, "results.json"), "w"), indent=1)
for png in glob.glob(os.path.join(work, "throughput", "throughput.png")):  # the scaling plot (issue 18)
    shutil.copy(png, os.path.join(out, "throughput.png"))
PY
}

run_step() {  # run_step NAME: the step's command (the list in the header)
  case $1 in
    kernels_tests) step kernels_tests 120 python3 -m pytest -q -rs -x tests/kernels ;;
    demo) step demo 120 python3 -m verl_mega demo --quick --nproc 1 --tp 1 --output-dir "$WORK/demo" ;;
    rollout_service) step rollout_service 300 python3 benchmarks/rollout_service.py --shapes "$ROLLOUT_SHAPES" --no-hf --profile \
      --grpo-shape '' ${ROLLOUT_VARIANTS:+--variants "$ROLLOUT_VARIANTS"} --out-dir "$WORK/rollout" ;;
    attention_sweep) step attention_sweep 200 python3 benchmarks/rollout_service.py --attention-sweep \
      --shapes "$ROLLOUT_SHAPES" --no-hf --no-static --grpo-shape '' --out-dir "$WORK/attention" ;;
    rollout_fast) step rollout_fast 540 python3 benchmarks/rollout_service.py --shapes "$ROLLOUT_SHAPES" "$HF_FLAG" \
      --grpo-shape '' ${ROLLOUT_VARIANTS:+--variants "$ROLLOUT_VARIANTS"} --out-dir "$WORK/rollout" ;;
    paged_tests) step paged_tests 300 python3 -m pytest -q -rf --tb=short tests/models/test_fused_ops.py \
      tests/rollout/test_fused_sampling.py tests/rollout/test_paged_attention.py tests/rollout/test_decode_windows.py \
      tests/trainer/test_trainer.py::test_a_deleted_trainer_frees_its_models ;;
    throughput) step throughput 300 python3 benchmarks/throughput.py --shapes 0.5b,1.5b --batches 8x8 --prompt-len 128 \
      --new-tokens 256 --kl off --attention "$ATTENTION" --micro-batch "$MICRO_BATCH" --compile "$COMPILE" \
      --out "$WORK/throughput" ;;
    trainer_auto) step trainer_auto 400 python3 benchmarks/throughput.py --shapes "$TRAINER_AUTO_SHAPES" --batches 64x8 \
      --prompt-len 128 --new-tokens 1024 --response-len 32:1024 --kl on --micro-batch tokens-auto --compile on \
      --steps 3 --warmup 1 --attention "$ATTENTION" --out "$WORK/trainer_auto" ;;
    profile_8x8) step profile_step 150 python3 benchmarks/throughput.py --shapes 0.5b --batches 8x8 --prompt-len 128 \
      --new-tokens 256 --kl off --steps 3 --profile --out "$WORK/profile"
      step profile_rollout 120 python3 benchmarks/rollout_service.py --shapes qwen2.5-0.5b --prompts 8 --n 8 \
      --min-len 256 --max-len 256 --no-hf --profile --grpo-shape '' --variants new_paged_fused \
      --out-dir "$WORK/profile_rollout" ;;
    trl_grpo) step trl_grpo 150 python3 benchmarks/trl_grpo.py --shape 0.5b --micro-batch "$TRL_MICRO_BATCH" \
      --out "$WORK/trl" ;;
    grpo_e2e_ab) step grpo_e2e_ab 240 python3 benchmarks/grpo_e2e.py --ab 0.5b --variants padded,packed,packed+compile --prompts 64 \
      --n 8 --prompt-len 128 --response-len 32:256 --max-new-tokens 256 --max-tokens 16384 --steps 3 \
      --attention "$ATTENTION" --out "$WORK/ab" ;;
    padded_width) step padded_width 240 python3 benchmarks/padded_width.py --out "$WORK/padded_width" ;;
    grpo_e2e_ab_full) step grpo_e2e_ab_full 560 python3 benchmarks/grpo_e2e.py --ab "$AB_SHAPES" \
      --variants "$AB_VARIANTS" --prompts 64 --n 8 --prompt-len 128 --response-len 32:1024 \
      --max-new-tokens 1024 "${AB_BUDGET[@]}" ${AB_LOGPROB_TOKENS:+--logprob-max-tokens "$AB_LOGPROB_TOKENS"} \
      ${AB_OWN:+--ab-budget own} --steps "$AB_STEPS" --attention "$ATTENTION" --out "$WORK/ab_full" ;;
    profile_update) step profile_update 450 python3 benchmarks/grpo_e2e.py --shape "$PROFILE_SHAPE" --compile \
      --packing on --prompts 64 --n 8 --prompt-len 128 --response-len 32:1024 --max-new-tokens 1024 \
      "${AB_BUDGET[@]}" --steps 3 --warmup 1 --profile-step 4 --attention "$ATTENTION" \
      --out "$WORK/profile_update" ;;
    reward_overlap) step reward_overlap 150 python3 benchmarks/rollout_service.py --shapes '' --no-hf \
      --grpo-shape qwen2.5-0.5b --out-dir "$WORK/reward_overlap" ;;
    graph_reuse) for mode in kept recapture keep_cache window; do
        case $mode in kept) flags="" ;; recapture) flags="--recapture" ;; keep_cache) flags="--keep-cache" ;;
          window) flags="--graph-window on" ;; esac
        step graph_reuse_$mode 200 python3 benchmarks/grpo_e2e.py --shape 1.5b --compile --packing on --prompts 64 \
          --n 8 --prompt-len 128 --response-len 32:1024 --max-new-tokens 1024 "${AB_BUDGET[@]}" --steps 3 \
          $flags --out "$WORK/graph_reuse_$mode"; done ;;
    packed) step packed 120 python3 benchmarks/grpo_e2e.py --shape 0.5b --prompts 64 --n 8 --prompt-len 128 \
      --response-len 32:256 --max-new-tokens 256 --max-tokens 16384 --steps 3 --packing on --out "$WORK/packed" ;;
    sampler_sizes) [[ -f .old/fused_sampling.py ]] || { echo "sampler_sizes: .old/fused_sampling.py not carried"; return; }
      step sampler_sizes 120 python3 benchmarks/sampler_sizes.py --baseline .old/fused_sampling.py --programs-per-sm 2,4,8,16 \
      --out-dir "$WORK/sampler" ;;
    pre_offload) [[ -d .old ]] || { echo "pre_offload: .old/ not carried"; return; }
      step pre_offload 120 env PYTHONPATH="$PWD/.old:/tmp/site" python3 .old/benchmarks/grpo_e2e.py --shape 0.5b \
      --prompts 64 --n 8 --prompt-len 128 --response-len 32:256 --max-new-tokens 256 --max-tokens 16384 --steps 3 \
      --packing on --out "$WORK/pre_offload" ;;
    offload_7b) step offload_7b 600 python3 benchmarks/grpo_e2e.py --shape 7b --offload-optimizer --offload-grads --recompute full \
      --prompts 16 --n 8 --prompt-len 512 --response-len 32:1024 --max-new-tokens 1024 --micro-batch 4 --steps 3 \
      --out "$WORK/offload" ;;
    vlm_gpu_check) step vlm_gpu_check 90 python3 benchmarks/vlm_gpu_check.py --out "$WORK/vlm_check" ;;
    vlm_grpo_step) step vlm_grpo_step 200 python3 benchmarks/vlm_grpo_step.py --prompts 16 --n 8 --image 448 --steps 2 \
      --out "$WORK/vlm" ;;
    vlm_vision_share) step vlm_vision_share 100 python3 benchmarks/vlm_vision_share.py --out "$WORK/vlm_share" ;;
    reward_models) step reward_models 320 python3 benchmarks/reward_models.py \
      --rewards rule,model,model_offload,judge,judge_offload --out "$WORK/rewards" ;;
    reward_judge) step reward_judge 240 python3 benchmarks/reward_models.py --rewards judge --steps 2 --out "$WORK/rewards" ;;
    agent_rollout) mkdir -p "$WORK/agent"
      step agent_rollout 200 python3 benchmarks/agent_rollout.py --prompts 8 --out "$WORK/agent/agent_rollout.json" ;;
  esac
}

for name in $PLAN; do run_step "$name"; done
collect
echo "done after $(( $(date +%s) - START )) s"; cat "$OUT/summary.md"
