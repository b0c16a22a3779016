#!/usr/bin/env bash
# The one test command (README and .ci/run): sets up .venv on a fresh machine, then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/worker -k engine`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
python -m pytest "$@"
