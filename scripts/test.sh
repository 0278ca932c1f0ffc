#!/usr/bin/env bash
# The test suite (CPU; about 6 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] && . .venv/bin/activate
python -m pytest -q "$@"
