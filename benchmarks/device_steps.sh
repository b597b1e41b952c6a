# Shared by run_h200.sh and run_multi_gpu.sh (sourced, after BUDGET and OUT are set): install the carried wheels,
# make the work folder WORK, record the GPUs in $WORK/gpu.txt, and define
#   step NAME CAP_SECONDS COMMAND...   run COMMAND under timeout min(CAP, what is left of BUDGET - 10) s, its log in
#                                      $WORK/NAME.log, one line (name, rc, seconds, command) in $WORK/steps.tsv, then
#                                      the sourcing script's `collect` (its <= 8 files under $OUT); a step that would
#                                      get under 30 s is listed as skipped.
START=$(date +%s)
WORK=$(mktemp -d /tmp/device.XXXX)  # the steps write here; `collect` picks what goes to $OUT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false || { echo "wheel install failed"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$WORK/gpu.txt" 2>&1
: > "$WORK/steps.tsv"

step() {
  local name=$1 cap=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) - 10 ))
  local limit=$(( cap < left ? cap : left ))
  if (( limit < 30 )); then
    printf '%s\tskipped\t0\t(%s s left)\n' "$name" "$left" >> "$WORK/steps.tsv"; echo "== $name skipped ($left s left)"
    return
  fi
  echo "== $name (timeout $limit s): $*"
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$*" >> "$WORK/steps.tsv"
  echo "   rc=$rc after $(( $(date +%s) - t0 )) s"; tail -n 3 "$WORK/$name.log"
  collect
}
