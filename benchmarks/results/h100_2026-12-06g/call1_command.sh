#!/usr/bin/env bash
# session 22, call 1 (issue 13): per-token RoPE, decode row buckets of 8, cuBLASLt graphs; GEMM shapes
set -u
T0=$(date +%s); CALL_S=${CALL_S:-585}; left() { echo $(( CALL_S - ($(date +%s) - T0) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee $OUT/machine.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $OUT/machine.txt
patch -p1 < gpu_rope.patch > $OUT/patch.log 2>&1 && echo "rope patch applied" | tee -a $OUT/machine.txt
timeout 150 python3 -m pytest -q -x tests/models/test_fused_ops.py > $OUT/tests.log 2>&1; rc=$?
tail -3 $OUT/tests.log
if [ $rc -ne 0 ]; then patch -R -p1 < gpu_rope.patch >> $OUT/patch.log 2>&1; echo "tests rc=$rc: rope patch reverted" | tee -a $OUT/machine.txt; fi
echo "after tests: $(left) s left"
mkdir -p /tmp/o
timeout $(( $(left) - 45 )) python3 benchmarks/rollout_service.py --shapes ${SHAPES:-qwen2.5-7b,qwen2.5-1.5b} \
  --variants ${VARIANTS:-new_paged_fused,new_paged_fused_step8,new_paged_fused_cublaslt,new_paged_fused_step8_cublaslt} --profile --grpo-shape '' \
  --out-dir /tmp/o > $OUT/rollout.log 2>&1; echo "rollout rc=$? $(left) s left" | tee -a $OUT/machine.txt
cp /tmp/o/*.json $OUT/ 2>/dev/null
tar czf $OUT/profiles.tgz -C /tmp/o . 2>/dev/null
L=$(left); if [ $L -gt 40 ]; then
timeout $(( L - 10 )) python3 benchmarks/gemm_shapes.py --rows 8,64,128,256,272,384,512 --out $OUT/gemm.json > $OUT/gemm.log 2>&1
echo "gemm rc=$? $(left) s left" | tee -a $OUT/machine.txt; fi
