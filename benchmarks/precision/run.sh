#!/usr/bin/env bash
# Precision per hop (issues 9 and 19): the same CPU training run with each replica-hop format: fp32, bf16,
# int8 blocks with error feedback, int8 without it. 2 gloo ranks as 2 emulated nodes x 1, partition 1 (so 2
# replicas, whose hop crosses the emulated nodes), the `tiny` GPT, 1500 steps; about 10 minutes a run on 2 cores.
set -eu
cd "$(dirname "$0")/../.."
common="--model tiny --nproc 2 --emulate-nodes 2 --partition-size 1 --accum 2 --steps 1500 --warmup 100 --eval-every 100 --log-every 1"
for hop in fp32 bf16 int8 int8-noef; do
  flags="--replica-reduce-dtype ${hop%-noef}"
  [[ $hop == *-noef ]] && flags="$flags --no-error-feedback"
  rm -rf "benchmarks/precision/replica-$hop"
  torchmics train $common $flags --out "benchmarks/precision/replica-$hop" > "benchmarks/precision/replica-$hop.log" 2>&1
done
python benchmarks/precision/compare.py benchmarks/precision/replica-{fp32,bf16,int8,int8-noef} > benchmarks/precision/results.md
