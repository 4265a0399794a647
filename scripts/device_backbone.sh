#!/usr/bin/env bash
# On a lent GPU (run by the `device` tool after scripts/device_prepare.sh): resume the retouch-16 backbone from
# its committed export for MINUTES of wall time, then bring the export and the log back through $OUT.
# No validation there (the photos stay here): validate and eval the weights here afterwards.
set -euo pipefail
MINUTES="${MINUTES:-8}" STEPS="${STEPS:-40000}" BATCH="${BATCH:-64}" LR="${LR:-1e-3}"
"${PYTHON:-python3}" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .device/whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
mkdir -p runs/backbone16 "${OUT:=/tmp/out}"
cp .device/episodes-*.pt runs/backbone16/
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
status=0
timeout --signal=TERM --kill-after=90 "$(( MINUTES * 60 ))" "${PYTHON:-python3}" -m demo_core.train backbone --fresh --device "${DEVICE:-cuda}" \
    --steps "$STEPS" --batch "$BATCH" --lr "$LR" --k-weights 3,2,1 --sequence-share 0.15 --context-loss 0.5 \
    --validate-every 0 --checkpoint-minutes 2 --log-every 100 --autocast auto --task-weights inpaint=2,colorize=2 \
    > "$OUT/backbone16-device.out" 2>&1 || status=$?
# SIGTERM at the limit is the plan: the trainer finishes its step, checkpoints and exports
cp checkpoints/retouch16/backbone/model.safetensors checkpoints/retouch16/backbone/training.json \
   checkpoints/retouch16/backbone/config.json runs/backbone16/train.log "$OUT"/
tail -5 runs/backbone16/train.log
exit $(( status == 124 ? 0 : status ))
