#!/usr/bin/env bash
# Idempotent set-up of everything ComRecycle needs on a fresh Debian 12 / Python 3.11 machine:
#   * Debian packages: libb64-0d (perf_analyzer) and redis-server
#   * the pinned dependencies of requirements.lock in a virtual environment cached outside the
#     repository under a key derived from the requirements (so a second run takes seconds); the
#     cached environment never holds this project, so any number of clones can share it
#   * ./.venv: a small virtual environment of this clone's own, which sees the cached dependencies
#     (a .pth file) and holds this clone's editable install and its `comrecycle` console script
# Override the cache folder with COMRECYCLE_VENV_HOME.
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

# The layout tag is part of the key: deps-only environments are not mixed with older ones that
# held an editable install of whichever clone ran set-up last.
LAYOUT=deps-only-1
KEY=$( { cat requirements.lock; echo "$LAYOUT"; } | sha256sum | cut -c1-16)
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
# This clone's own environment. An older layout linked .venv to the shared cache: remove the link
# only (never what it points to).
if [ -L .venv ]; then rm -f .venv; fi
DEPS_SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -x .venv/bin/python ] || ! grep -qs "$VENV" .venv/.comrecycle-deps; then
  rm -rf .venv
  $PY -m venv --without-pip .venv
  echo "$VENV" > .venv/.comrecycle-deps
fi
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# addsitedir (not a bare path) so that the cached environment's own .pth files are processed too.
echo "import site; site.addsitedir('$DEPS_SITE')" > "$SITE/_comrecycle_deps.pth"
# Tools the cached environment carries as binaries (perf_analyzer, perf_client): linked into .venv/bin.
for tool in perf_analyzer perf_client; do
  if [ -e "$VENV/bin/$tool" ]; then ln -sfn "$VENV/bin/$tool" ".venv/bin/$tool"; fi
done
# The editable install of this clone, with its console script, goes into .venv only.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . 2>&1 \
  | { grep -v "^WARNING: Location" || true; }
test "${PIPESTATUS[0]}" = 0
.venv/bin/python -c "import comrecycle, tritonclient, onnxruntime, torch; print('[setup] ok:', comrecycle.__file__)"
