#!/usr/bin/env bash
# Prepare a backbone run on a lent GPU (the `device` tool), here on the CPU machine, before its `run`:
#   1. the wheels the GPU image lacks (diffusers for the tokenizer, importlib_metadata) into .device/whl
#      (.device/ is in .gitignore: it travels only as `carry`);
#   2. the episode pool (runs/backbone16/episodes-*.pt, built here by the trainer) into .device/;
#   3. what the call sends kept under its 64 MiB: the tracked default bundle (assets/retouch-tiny, 38 MB) and the
#      parked first-generation run (checkpoints/backbone-dq0, 16 MB) leave the index for the run (files stay on
#      disk) and are ignored through .git/info/exclude; `scripts/device_prepare.sh --undo` puts both back.
# Then: run(command="bash scripts/device_backbone.sh", carry=[".device"], timeout_s=600); see docs/training.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PARKED=(assets/retouch-tiny checkpoints/backbone-dq0)
EXCLUDE="$(git rev-parse --git-path info/exclude)"; mkdir -p "$(dirname "$EXCLUDE")"
if [ "${1:-}" = "--undo" ]; then
  git reset -q -- "${PARKED[@]}"
  [ -f "$EXCLUDE" ] && sed -i '/^# device_prepare begin$/,/^# device_prepare end$/d' "$EXCLUDE"
  echo "index restored: git status should be clean again"
  exit 0
fi
VENV="$("$ROOT/scripts/setup.sh")"
mkdir -p .device/whl
for wheel in diffusers==0.42.1 importlib_metadata; do
  "$VENV/bin/pip" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 -d .device/whl "$wheel"
done
pool=$(ls runs/backbone16/episodes-*-debian-0.pt 2>/dev/null | head -1 || true)
if [ -z "$pool" ]; then
  echo "no episode pool in runs/backbone16: build it first (python -m demo_core.train backbone ... builds it at the start)" >&2
  exit 1
fi
cp "$pool" .device/
sed -i '/^# device_prepare begin$/,/^# device_prepare end$/d' "$EXCLUDE" 2>/dev/null || true
{ echo "# device_prepare begin"; for path in "${PARKED[@]}"; do echo "/$path/"; done; echo "# device_prepare end"; } >> "$EXCLUDE"
for path in "${PARKED[@]}"; do
  git rm -r -q --cached --ignore-unmatch "$path"
done
bytes=$(git ls-files -z -c -o --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cb .device | tail -1 | cut -f1)
echo "the call would send $(( (bytes + carried) / 1048576 )) MiB (limit 64): tree $(( bytes / 1048576 )), .device $(( carried / 1048576 ))"
[ $(( bytes + carried )) -lt $(( 64 * 1048576 )) ] || { echo "over the limit: carry less" >&2; exit 1; }
