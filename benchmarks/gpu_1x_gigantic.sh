#!/usr/bin/env bash
# Issue 13 on one H200: the largest GPT preset `torchmics train` trains with and without --cpu-offload
# (tokens/s, MFU, peak GPU memory from the run, peak host RSS of the worker from getrusage), time to the
# first step (the run's `startup` line), the planner's verdict on what does not fit, and a fine-tune of a
# Hugging Face folder whose first loss must equal transformers' own. Logs and runs land in $OUT.
# About 9 minutes. Usage: bash benchmarks/gpu_1x_gigantic.sh
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; RES="$OUT/h200-gigantic-1x1"; mkdir -p "$RES"
TRAIN="--nproc 1 --partition-size auto --mixed-precision bf16 --micro-batch 1 --seq-len 2048 --activation-checkpointing --eval-every 1000"
# Peak resident memory of the largest descendant (the worker), besides the command's own output.
peak_host() { python3 -c 'import resource, subprocess, sys
r = subprocess.run(sys.argv[1:])
print(f"peak host RSS of the largest process: {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20:.1f} GiB")
sys.exit(r.returncode)' "$@"; }
run() {  # name, seconds, flags...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  timeout "$limit" bash -c "$(declare -f peak_host); peak_host python3 -m torchmics.cli train $TRAIN $* --out $RES/$name" \
    > "$OUT/$name.log" 2>&1
  echo "exit $?"; grep -v -e Warning -e "return func" "$OUT/$name.log" | grep -e "^weights" -e "^startup" -e "^memory" \
    -e "^step" -e "done in" -e "error" -e "peak host" -e "Error" | tail -12
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; free -g | head -2
python3 -m torchmics.cli plan --model 13b --nodes 1 --cluster h200-3200 --gpus-per-node 1 --micro-batch 1 \
  --activation-checkpointing --cpu-offload | tail -4
run 6.7b 170 --model 6.7b --steps 6 --log-every 2
run 13b 60 --model 13b --steps 2 --log-every 1                       # expected: refused by the planner
run 2.7b-offload 120 --model 2.7b --cpu-offload --steps 3 --log-every 1
run 6.7b-offload 200 --model 6.7b --cpu-offload --steps 3 --log-every 1
timeout 150 python3 benchmarks/pretrained_first_loss.py --out "$RES/pretrained" 2>&1 | grep -v Warning | tail -4
rm -rf "$RES"/pretrained/llama; du -sh "$RES"/* 2>/dev/null
