#!/usr/bin/env bash
# Set up (once) and run the studio on the embedded default at http://127.0.0.1:7860.
# With arguments, runs the command line instead: scripts/run.sh generate --pair X Y --query Q --out out.png
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$("$ROOT/scripts/setup.sh")"
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1 HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # relative paths in arguments stay relative to where you are
if [ "$#" -gt 0 ]; then
  exec "$VENV/bin/python" -m demo_core "$@"
fi
exec "$VENV/bin/python" "$ROOT/app.py"
