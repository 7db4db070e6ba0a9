#!/usr/bin/env bash
# Install vramguard with torch and Pillow into .venv and run the demo (the main job):
# a tiled x4 upscale of a built-in image under a reserve, GC hooks on.  Output: ./vramguard_out
#   bash scripts/demo.sh [--out DIR] [--size PX] [--reserve 1.5GB]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "setuptools>=64" wheel "numpy>=2" "pillow>=9"
# the CPU build where the machine provides it; otherwise whatever torch the index offers
"$venv/bin/pip" install -q --disable-pip-version-check "torch==2.13.0" 2>/dev/null \
  || "$venv/bin/pip" install -q --disable-pip-version-check torch
"$venv/bin/pip" install -q --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall .
exec "$venv/bin/python" -m vramguard demo "$@"
