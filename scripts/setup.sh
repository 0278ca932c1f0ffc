#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with denoiseg and its test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch would resolve to the newest CUDA build
# (gigabytes); 2.13.0 is the CPU build this project is developed and tested with.
python -m pip install -q "torch==2.13.0"
# The napari plugin's extra (napari, PyQt5, pytest-qt, pytest-xvfb) is installed too, so the
# test command also runs the viewer tests; DENOISEG_NAPARI=0 leaves it out (the CLI does not need it).
if [ "${DENOISEG_NAPARI:-1}" = 0 ]; then
  python -m pip install -q -e ".[test]"
else
  python -m pip install -q -e ".[test,napari]"
fi
