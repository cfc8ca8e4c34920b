#!/usr/bin/env bash
# Precision per hop (issue 9): the same CPU training run with the replica hop in fp32 and in bf16.
# 4 gloo ranks as 2 emulated nodes x 2, partition 2 (so 2 replicas), the `tiny` GPT, 1500 steps.
set -eu
cd "$(dirname "$0")/../.."
common="--model tiny --nproc 4 --emulate-nodes 2 --partition-size 2 --accum 2 --steps 1500 --warmup 100 --eval-every 100"
for dtype in fp32 bf16; do
  rm -rf "benchmarks/precision/replica-$dtype"
  torchmics train $common --replica-reduce-dtype $dtype --out "benchmarks/precision/replica-$dtype" > "benchmarks/precision/replica-$dtype.log" 2>&1
done
python benchmarks/precision/compare.py benchmarks/precision/replica-fp32 benchmarks/precision/replica-bf16
