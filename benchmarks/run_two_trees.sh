#!/usr/bin/env bash
# A/B of a branch in one device call: benchmarks/run_h200.sh's steps on this checkout, then on a second tree.
#   git archive BRANCH | (mkdir -p other && tar -x -C other)        # on the dev machine; leave other/ untracked
#   device tool: command "bash benchmarks/run_two_trees.sh other paged_tests throughput", carry [".whl"]
# The second tree must be an untracked, not ignored folder of this checkout (the device tool copies those). Each tree
# gets its own share of the call: BUDGET_MAIN (default 270 s) for this checkout, then what is left of TOTAL (default
# 560 s) for the other. Env such as MICRO_BATCH or COMPILE reaches both runs.
# Writes $OUT/main/ (run_h200.sh's files for this checkout) and $OUT/<folder>.tgz (the other tree's files as one
# archive: the device tool brings back at most 8 files), plus $OUT/two_trees.txt (both runs' console output).
set -u
OUT=${OUT:?set OUT (the device tool does)}
OTHER=${1:?usage: run_two_trees.sh FOLDER STEP...}; shift
[[ -d $OTHER/benchmarks ]] || { echo "$OTHER: not a checkout (no benchmarks/)"; exit 2; }
(( $# )) || { echo "usage: run_two_trees.sh FOLDER STEP..."; exit 2; }
T0=$(date +%s)
TOTAL=${TOTAL:-560}
rm -rf "$OTHER/.whl" && ln -s "$PWD/.whl" "$OTHER/.whl"  # the carried wheels, for the other tree's install
mkdir -p "$OUT/main"
{ echo "== this checkout: $*"; BUDGET=${BUDGET_MAIN:-270} OUT=$OUT/main bash benchmarks/run_h200.sh "$@"; } \
  > "$OUT/two_trees.txt" 2>&1
LEFT=$(( TOTAL - ($(date +%s) - T0) ))
OTHER_OUT=$(mktemp -d /tmp/other_out.XXXX)
{ echo "== $OTHER ($LEFT s left): $*"; (cd "$OTHER" && BUDGET=$LEFT OUT=$OTHER_OUT bash benchmarks/run_h200.sh "$@"); } \
  >> "$OUT/two_trees.txt" 2>&1
tar czf "$OUT/$(basename "$OTHER").tgz" -C "$OTHER_OUT" .
echo "done after $(( $(date +%s) - T0 )) s: $OUT/main/summary.md, $OUT/$(basename "$OTHER").tgz"
