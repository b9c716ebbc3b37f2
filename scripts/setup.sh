#!/usr/bin/env bash
# Idempotent set-up, sourced by launch.sh and test.sh: a .venv in the checkout with the pinned
# requirements and the checkout installed editable. A stamp of requirements.txt and pyproject.toml
# makes the second run instant.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
PYTHON_BIN="${PYTHON:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3
STAMP="$VENV/.requirements.sha256"
want="$(cat "$REPO/requirements.txt" "$REPO/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON_BIN --version 2>&1)"
  "$PYTHON_BIN" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements (torch first: an unpinned torch would pull a CUDA build)"
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==2.13.0"
  # DS_BUILD_OPS=0: DeepSpeed builds its C++/CUDA ops lazily, so the install takes seconds.
  DS_BUILD_OPS=0 "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REPO/requirements.txt"
  # The checkout itself, editable (pyproject.toml): `train` and `tools` import from anywhere, and the
  # dcd-* console scripts exist. No dependencies: requirements.txt pinned them above.
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps -e "$REPO"
  echo "$want" > "$STAMP"
else
  echo "[setup] .venv up to date"
fi
export PATH="$VENV/bin:$PATH"
# Nothing is fetched from a model hub at run time; DeepSpeed's JIT ops cache stays in the checkout.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO/.cache/torch_extensions}"
