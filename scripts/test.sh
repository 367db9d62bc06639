#!/usr/bin/env bash
# The test command: set-up (idempotent) + the whole suite (unit + integration against a real
# tritonserver). Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not integration"`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest --timeout 1200 "$@"
