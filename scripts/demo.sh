#!/usr/bin/env bash
# The main job: set-up (idempotent), build the default model set if missing (a few minutes,
# cached in artifacts/), start the embedded tritonserver, replay simulated sessions through
# it in a feedback loop and report. Extra arguments go to `comrecycle demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/comrecycle demo "$@"
