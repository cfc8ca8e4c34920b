#!/usr/bin/env bash
# Issue 14 in one call on one H200: is `torchmics train`'s speed the real one, and does compile pay?
# The 1.4b preset, seq 2048, micro-batch 4, bf16 parameters with fp32 reduction, accumulation 1, gradient
# clipping at 1.0 (what `train` does), eager and compiled:
#   1. `torchmics bench`, systems torchmics and single (the plain unsharded loop), one profiled step each;
#   2. `torchmics train` on the same settings (its printed speed must be within 3% of bench's torchmics);
#   3. a compile diagnostic: the whole step of the plain loop, FSDP2 alone and torchmics at micro-batch 4 and 8,
#      graph breaks, recompiles, host-side profiles (benchmarks/compile_diagnosis.py);
#   4. bench compiled at micro-batch 8 (the MFU aim), in $RES/micro-batch-8.
# Everything lands in $OUT: results in $OUT/h200-train-1x1 (copy to benchmarks/results/), logs next to it.
# About 5 minutes; the parts' time limits add up to 590 s, under one 600 s device call. Usage: bash benchmarks/gpu_1x_train.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; RES="$OUT/h200-train-1x1"; mkdir -p "$RES"
quiet() { grep -v -e Warning -e "return func"; }
SHAPE=${SHAPE:-"--model 1.4b --seq-len 2048 --micro-batch 4 --accum 1"}  # override only to smoke-test the script
BENCH="$SHAPE --nproc 1 --systems torchmics,single --param-dtype bf16 --reduce-dtype fp32 --grad-clip 1.0 --steps 10 --warmup 3 --profile"
TRAIN="$SHAPE --nproc 1 --partition-size 1 --mixed-precision bf16 --steps 40 --log-every 10 --eval-every 40 --eval-batches 2"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$RES/device.txt"

timeout 90 python3 -m torchmics.cli bench $BENCH --out "$RES" 2>&1 | quiet | tee -a "$OUT/bench.log"
TORCH_LOGS=graph_breaks,recompiles timeout 150 python3 -m torchmics.cli bench $BENCH --compile --out "$RES" 2>&1 \
  | quiet | tee -a "$OUT/bench.log"
for mode in eager compiled; do
  flag=$([ $mode = compiled ] && echo --compile); limit=$([ $mode = compiled ] && echo 110 || echo 70)
  TORCH_LOGS=graph_breaks,recompiles timeout $limit python3 -m torchmics.cli train $TRAIN $flag --out "$RES/train-$mode" \
    2>&1 | quiet | tee "$OUT/train-$mode.log" | grep -e "^step" -e "done in" -e "stopped" -e "error" -e "schedule"
done
python3 benchmarks/train_vs_bench.py "$RES" | tee "$RES/summary.md"
TORCH_LOGS=graph_breaks,recompiles timeout 70 python3 benchmarks/compile_diagnosis.py ${DIAGNOSIS:---micro-batch 4} \
  --profile "$RES/host-profiles" 2>&1 | quiet | tee "$RES/compile-diagnosis.txt"
timeout 100 python3 -m torchmics.cli bench ${BENCH/--micro-batch 4/--micro-batch 8} --compile --out "$RES/micro-batch-8" 2>&1 \
  | quiet | tee -a "$OUT/bench.log"
du -sh "$RES"/* | tee "$OUT/sizes.txt"
