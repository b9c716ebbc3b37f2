#!/usr/bin/env bash
# The test command: set up the venv if needed, then run every test, the slow end-to-end ones
# (pytest marker `slow`) included. Extra arguments go to pytest (e.g. ./test.sh -m "not slow").
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup.sh
exec python -m pytest "$@"
