# session 18 call 1: is the 0.5B packed step's training-side variance between processes the host or the GPU?
set -u
START=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false || { echo "wheel install failed"; exit 1; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv; lscpu | head -20;
  nproc; free -g; numactl --hardware 2>/dev/null | head; } > $OUT/host.txt 2>&1
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,clocks_event_reasons.active \
  --format=csv -lms 500 > $OUT/smi.csv 2>&1 &
SMI=$!
hostspeed() { python3 -c "
import time
t=time.perf_counter(); s=0
for i in range(3_000_000): s+=i
print('host python loop 3M: %.3f s' % (time.perf_counter()-t))"; }
run() {  # NAME SHAPE STEPS PROFILE_STEP CAP
  local left=$(( 560 - ($(date +%s) - START) ))
  local cap=$(( $5 < left ? $5 : left ))
  (( cap < 60 )) && { echo "== $1 skipped ($left s left)"; return; }
  echo "== $1 (cap $cap s) $(date +%T)"; hostspeed
  timeout $cap python3 benchmarks/grpo_e2e.py --shape $2 --compile --packing on --prompts 64 --n 8 --prompt-len 128 \
    --response-len 32:1024 --max-new-tokens 1024 --max-tokens 8192 --steps $3 --warmup 1 --profile-step $4 \
    --out /tmp/$1 > /tmp/$1.log 2>&1
  echo "   rc=$? $(date +%T)"; hostspeed
  grep -h '"per_step"' -A0 /tmp/$1.log | head -2
  cp /tmp/$1/grpo_e2e_profile.txt $OUT/$1_profile.txt 2>/dev/null
  python3 - /tmp/$1/grpo_e2e.json $OUT/$1.json <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print("no json", e); sys.exit()
for r in d["results"]:
    print({k: r[k] for k in ("time/generate", "time/logprob", "time/update", "time/step", "update_mfu")}, r["per_step"])
json.dump(d, open(sys.argv[2], "w"), indent=1)
PY
  tail -n 5 /tmp/$1.log
}
run A05 0.5b 4 5 200
run B05 0.5b 4 5 200
run C15 1.5b 2 3 200
kill $SMI
