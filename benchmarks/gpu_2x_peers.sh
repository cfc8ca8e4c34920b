#!/usr/bin/env bash
# Every peer in one call on 2 GPUs (issue 4 and 9): 2 emulated nodes x 1 GPU, accumulation 4, bf16
# reduction, 1.4B preset, with one profiled step per system. Part "check" first trains gpt2-124m on the
# same emulated nodes with each replica hop: FSDP2's, torchmics' bf16 one, the replica-sharded optimizer
# (their losses must agree).
# DeepSpeed 0.18.9 travels as wheels in .whl/ (carry it). Usage: bash benchmarks/gpu_2x_peers.sh [check|peers|replica|all]
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
quiet() { grep -v -e Warning -e "return func" -e "\] \[INFO\] "; }
part=${1:-all}
if [ "$part" = all ] || [ "$part" = check ]; then
  for variant in "" "--replica-reduce-dtype bf16" "--optimizer-over-replicas"; do  # the 3 replica hops
    timeout 120 python3 -m torchmics.cli train --model gpt2-124m --mixed-precision bf16 --micro-batch 8 --seq-len 1024 \
      --accum 2 --steps 30 --warmup 5 --eval-every 30 --emulate-nodes 2 --partition-size 1 $variant \
      --out "$OUT/train-check/${variant:-plain}" 2>&1 | quiet | grep "done in" | sed "s|^|[${variant:-plain}] |" | tee -a "$OUT/check.log"
  done
fi
if [ "$part" = replica ]; then  # the replica-sharded optimizer next to plain two-hop, profiled
  python3 -m torchmics.cli bench --steps 6 --warmup 2 --out "$OUT/replica" --emulate-nodes 2 --accum 4 \
    --partition-size 1 --reduce-dtype bf16 --profile --systems torchmics,torchmics-optimizer-over-replicas 2>&1 | quiet | tee -a "$OUT/bench.log"
fi
if [ "$part" = all ] || [ "$part" = peers ]; then
  python3 -m torchmics.cli bench --steps 4 --warmup 2 --out "$OUT/emulated" --emulate-nodes 2 --accum 4 \
    --partition-size 1 --reduce-dtype bf16 --profile \
    --systems torchmics,torchmics-optimizer-over-replicas,fsdp2-hsdp,deepspeed-mics,deepspeed-zero3,fsdp2-full 2>&1 | quiet | tee -a "$OUT/bench.log"
fi
