#!/usr/bin/env bash
# Smoke test of the DeepSpeed peers (docs/design.md §7) on a GPU machine without internet.
# DeepSpeed 0.18.9 (the last release with MiCS) and the dependencies the machine lacks travel as wheels
# in .whl/ (git-ignored: pass it along, e.g. carry=[".whl"]); they are installed into /tmp/site.
# Runs the tiny model (wiring: every parameter stays below DeepSpeed's 1e5-element persistence
# threshold, so nothing is partitioned) and gpt2-124m at seq 256 (parameters really partitioned),
# then, with 4+ GPUs, MiCS spanning two emulated nodes (its hierarchical gather). Exit 1 on a failure.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
python3 -c "import deepspeed, torch; print('deepspeed', deepspeed.__version__, 'torch', torch.__version__)" 2>&1 | tail -1
python3 -c "from torchmics.bench.deepspeed_peer import DEEPSPEED_SYSTEMS, DEEPSPEED_UNAVAILABLE as why
print('DeepSpeed peers:', ', '.join(DEEPSPEED_SYSTEMS) or why)"

gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
ds=deepspeed-zero3,deepspeed-mics,deepspeed-mics-flat
bench() { python3 -m torchmics.cli bench --out "$OUT/deepspeed" --steps 2 --warmup 1 --accum 2 "$@" 2>&1 \
            | grep -v -e Warning -e "return func" -e "\] \[INFO\] " | tee -a "$OUT/deepspeed.log"; }
bench --model tiny --nproc 2 --systems $ds
bench --model gpt2-124m --seq-len 256 --nproc 2 --systems $ds,fsdp2-full
if [ "$gpus" -ge 4 ]; then
  bench --model gpt2-124m --seq-len 256 --nproc 4 --emulate-nodes 2 --partition-size 4 --systems deepspeed-mics,deepspeed-mics-flat,torchmics
fi
python3 - "$OUT/deepspeed/results.jsonl" <<'EOF'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
failed = [r for r in records if r["status"] != "ok"]
for r in failed:
    print(f"FAILED {r['system']} (partition {r['partition_size']}): {r.get('error', '')[-600:]}")
print(f"{len(records) - len(failed)}/{len(records)} runs ok")
sys.exit(1 if failed else 0)
EOF
