#!/usr/bin/env bash
# The test suite (CPU; 6-12 minutes on 2 cores: 5.6 in the last CI run, 8.7 and 11.8 on the development machine).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d .venv ] && . .venv/bin/activate
python -m pytest -q "$@"
