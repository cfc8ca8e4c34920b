#!/bin/bash
# Fault-tolerant MiCS on one machine: a torchft lighthouse and N replica groups, each restarted when it dies.
#
#   bash examples/ft_local.sh                 # 2 groups x 2 CPU ranks (or 2 GPUs each), the tiny GPT
#   REPLICA_GROUPS=3 NPROC=2 bash examples/ft_local.sh --model small --steps 500
#   kill -9 <a worker of one group>           # the others train on; the group restarts and rejoins
#
# Each group is its own `torchmics train --fault-tolerant` job (its partition group is its world);
# extra arguments go to every group. A group's run folder is $OUT/group<g>. With GPUs, group g uses
# GPUs [g*NPROC, (g+1)*NPROC). Ctrl-C stops everything.
set -euo pipefail

REPLICA_GROUPS=${REPLICA_GROUPS:-2}
NPROC=${NPROC:-2}
OUT=${OUT:-runs/ft-local}
PORT=${PORT:-29510}
export TORCHFT_LIGHTHOUSE=http://localhost:$PORT

# min_replicas 1: survivors train on alone (a group that comes up late is healed at its first step);
# join_timeout: how long a quorum waits for a group that heartbeats but has not asked yet.
mkdir -p "$OUT"
torchft_lighthouse --min_replicas 1 --join_timeout_ms 10000 --bind "[::]:$PORT" > "$OUT/lighthouse.log" 2>&1 &
LIGHTHOUSE=$!
trap 'kill $(jobs -p) 2>/dev/null' EXIT
sleep 1

run_group() {  # restarts the group until it finishes: a restarted group rejoins from a live one
    local g=$1; shift
    if command -v nvidia-smi >/dev/null; then
        export CUDA_VISIBLE_DEVICES=$(seq -s, $((g * NPROC)) $((g * NPROC + NPROC - 1)))
    fi
    until torchmics train --fault-tolerant --replica-group "$g" --replica-groups "$REPLICA_GROUPS" --nproc "$NPROC" \
            --model tiny --resume auto --out "$OUT/group$g" "$@"; do
        echo "group $g failed; restarting it" >&2
        sleep 1
    done
}

for g in $(seq 0 $((REPLICA_GROUPS - 1))); do
    run_group "$g" "$@" &
done
wait $(jobs -p | grep -v "^$LIGHTHOUSE$")
