#!/usr/bin/env bash
# Sets up .venv on a fresh machine (idempotent, fast when done): CPU torch unless one is installed,
# hotswap with its worker and dev extras, and the demo model. Sourced by test.sh and up.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
# 2.13.0 is the CPU build on the dev/CI machines; keep a torch that is already installed (GPU boxes).
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
# The demo model (converted once into ~/.cache/hotswap; instant afterwards).
python scripts/fetch_demo_model.py
