#!/usr/bin/env bash
# The one command that runs the whole stack locally on a fresh machine: sets up .venv (like the
# tests), then `hotswap up` (embedded Redis, file storage, scheduler, a worker, the API on :8000).
# Extra arguments go to `hotswap up`, e.g. `bash scripts/up.sh --port 8080`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
exec hotswap up "$@"
