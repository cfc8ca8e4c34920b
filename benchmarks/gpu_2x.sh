#!/usr/bin/env bash
# The 2-GPU measurements of issue 4, in one call on the device machine (see benchmarks/README.md).
# NVLink (1 node x 2) at accumulation 1 and 4, then 2 emulated nodes x 1 GPU at accumulation 4 with
# bf16 and fp32 replica reduction; every baseline in the same call. Logs go to $OUT.
# Usage: bash benchmarks/gpu_2x.sh [nvlink|compile|emulated|all]
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bench() { python3 -m torchmics.cli bench --steps 5 --warmup 2 "$@" 2>&1 | grep -v -e Warning -e "return func" | tee -a "$OUT/bench.log"; }
part=${1:-all}
if [ "$part" = all ] || [ "$part" = nvlink ]; then
  bench --out "$OUT/nvlink" --accum 1 --systems torchmics,fsdp2-full,ddp
  bench --out "$OUT/nvlink" --accum 4 --systems torchmics,fsdp2-full
  bench --out "$OUT/nvlink" --collectives
fi
if [ "$part" = all ] || [ "$part" = compile ]; then  # eager and compiled in one call (issue 4's MFU target)
  bench --out "$OUT/nvlink-compile" --accum 1 --systems torchmics,fsdp2-full
  bench --out "$OUT/nvlink-compile" --accum 1 --systems torchmics,fsdp2-full --compile
  bench --out "$OUT/nvlink-compile" --accum 4 --systems torchmics,fsdp2-full --compile
fi
if [ "$part" = all ] || [ "$part" = emulated ]; then
  bench --out "$OUT/emulated" --emulate-nodes 2 --accum 4 --partition-size 1 --reduce-dtype bf16 \
        --systems torchmics,fsdp2-hsdp,fsdp2-full,torchmics-no-two-hop,ddp
  bench --out "$OUT/emulated" --emulate-nodes 2 --accum 4 --partition-size 1 --reduce-dtype fp32 \
        --systems torchmics,fsdp2-hsdp,fsdp2-full
  bench --out "$OUT/emulated" --emulate-nodes 2 --collectives
fi
