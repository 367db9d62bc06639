#!/usr/bin/env bash
# Idempotent set-up of everything ComRecycle needs on a fresh Debian 12 / Python 3.11 machine:
#   * Debian packages: libb64-0d (perf_analyzer) and redis-server
#   * a virtual environment with the pinned dependencies of requirements.lock, cached outside the
#     repository under a key derived from the requirements (so a second run takes seconds)
#   * the project itself (editable), which provides the `comrecycle` console script
# The venv is linked at ./.venv. Override the cache folder with COMRECYCLE_VENV_HOME.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}

need_apt=()
[ -e /usr/lib/x86_64-linux-gnu/libb64.so.0d ] || ls /usr/lib/*/libb64.so.0d >/dev/null 2>&1 || need_apt+=(libb64-0d)
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] installing Debian packages: ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

KEY=$(cat requirements.lock | sha256sum | cut -c1-16)
VENV_HOME=${COMRECYCLE_VENV_HOME:-$HOME/.cache/comrecycle}
VENV=$VENV_HOME/venv-py$($PY -c 'import sys;print(f"{sys.version_info[0]}{sys.version_info[1]}")')-$KEY
if [ ! -f "$VENV/.complete" ]; then
  echo "[setup] creating $VENV (first run: a few minutes)"
  rm -rf "$VENV"
  mkdir -p "$VENV_HOME"
  $PY -m venv "$VENV"
  # (the machine's pip config lists local indexes that may be absent: silence only those warnings)
  "$VENV/bin/pip" install -q --disable-pip-version-check -r requirements.lock 2>&1 \
    | { grep -v "^WARNING: Location" || true; }
  test "${PIPESTATUS[0]}" = 0
  touch "$VENV/.complete"
else
  echo "[setup] dependencies cached in $VENV"
fi
# Point the editable install at this checkout (cheap; keeps a cached venv valid for any clone).
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 \
  | { grep -v "^WARNING: Location" || true; }
test "${PIPESTATUS[0]}" = 0
ln -sfn "$VENV" .venv
"$VENV/bin/python" -c "import comrecycle, tritonclient, onnxruntime, torch; print('[setup] ok:', comrecycle.__file__)"
