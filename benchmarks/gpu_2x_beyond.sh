#!/usr/bin/env bash
# Second 2-GPU call: `torchmics train` on the GPUs, then 2 emulated nodes x 1 GPU (accumulation 4,
# bf16 reduce) with the beyond-MiCS optimizer sharding and DeepSpeed 0.18.9 ZeRO-3 / MiCS next to
# torchmics and FSDP2 HSDP, all in one call. DeepSpeed travels as wheels in .whl/ (carry it).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
quiet() { grep -v -e Warning -e "return func" -e "\] \[INFO\] "; }
timeout 150 python3 -m torchmics.cli train --model gpt2-124m --mixed-precision bf16 --micro-batch 8 --seq-len 1024 \
  --accum 2 --steps 40 --warmup 5 --eval-every 20 --partition-size auto --out "$OUT/train-gpu" 2>&1 | quiet | tee "$OUT/train-gpu.log"
bench() { python3 -m torchmics.cli bench --steps 4 --warmup 2 --out "$OUT/emulated" --emulate-nodes 2 --accum 4 \
          --partition-size 1 --reduce-dtype bf16 "$@" 2>&1 | quiet | tee -a "$OUT/bench.log"; }
bench --systems torchmics,torchmics-replica-optimizer,fsdp2-hsdp
[ "${SKIP_DEEPSPEED:-0}" = 1 ] || bench --systems deepspeed-mics,deepspeed-zero3
