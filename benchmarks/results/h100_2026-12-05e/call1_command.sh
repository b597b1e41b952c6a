#!/usr/bin/env bash
# session-12 device call 1 (not committed): main's throughput (compile off/on, auto micro-batch) + TRL at 64, then the
# decode-fusion branch (fusion/) paged/fused tests and its 0.5B throughput with compile on, tarred into one file.
set -u
T0=$(date +%s)
rm -rf fusion/.whl; ln -s ../.whl fusion/.whl
mkdir -p $OUT/main
MICRO_BATCH=auto TRL_MICRO_BATCH=64 COMPILE=off,on BUDGET=${MAIN_BUDGET:-300} OUT=$OUT/main bash benchmarks/run_h200.sh throughput trl_grpo > $OUT/main_run.txt 2>&1
echo "main part done after $(( $(date +%s) - T0 )) s" >> $OUT/main_run.txt
LEFT=$(( ${TOTAL:-560} - ($(date +%s) - T0) ))
cd fusion && mkdir -p /tmp/fout && MICRO_BATCH=auto COMPILE=on BUDGET=$LEFT OUT=/tmp/fout bash benchmarks/run_h200.sh paged_tests throughput > /tmp/fout/run.txt 2>&1
tar czf $OUT/fusion.tgz -C /tmp/fout .
echo "all done after $(( $(date +%s) - T0 )) s"
