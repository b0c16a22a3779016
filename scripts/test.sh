#!/usr/bin/env bash
# The one test command (README and .ci/run): sets up .venv on a fresh machine, then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/worker -k engine`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
# 2.13.0 is the CPU build on the dev/CI machines; keep a torch that is already installed (GPU boxes).
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[dev]"
# The demo model the tests run on (converted once into ~/.cache/hotswap; instant afterwards).
python scripts/fetch_demo_model.py
python -m pytest "$@"
