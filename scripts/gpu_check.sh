#!/usr/bin/env bash
# The GPU model repository on a machine with an NVIDIA GPU, in one short run:
#   1. the GPU and driver (nvidia-smi);
#   2. each GPU model's onnxruntime session (retrieval, prerank, rank, rerank, estimator) asks for
#      the CUDA execution provider and gets it: the check fails if any runs on the CPU (the
#      router itself runs its copy of the estimator on its CPU: local_estimator = 1);
#   3. perf.router_perf on the GPU repository (recycle_router against the always-full cascade,
#      both served by the embedded tritonserver with the stages on the GPU), while nvidia-smi
#      samples the GPU's use once a second;
#   4. the server's log is searched for a GPU model that fell back to the CPU.
#
# Needs: the project's Python dependencies (onnxruntime-gpu finds CUDA 13 and cuDNN 9, e.g. the
# nvidia-* wheels, on LD_LIBRARY_PATH), redis-server, and artifacts/model_repository/gpu with the
# estimator and router params installed:
#   python build_models.py --variant gpu
#   python -c "from pathlib import Path; from comrecycle.policy.deploy import ensure_router; \
#              ensure_router(Path('artifacts/model_repository/gpu'), Path('artifacts/models/default'))"
#
#   bash scripts/gpu_check.sh [OUT]      # OUT defaults to runs/gpu_check
# Settings through the environment: PYTHON (python3), REPOSITORY (artifacts/model_repository/gpu),
# CONCURRENCY ("1 4 16"), MEASUREMENT_MS (6000), ROUNDS (1), USERS (400).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-runs/gpu_check}
PY=${PYTHON:-python3}
REPOSITORY=${REPOSITORY:-artifacts/model_repository/gpu}
mkdir -p "$OUT/tmp"
LOGDIR=$(cd "$OUT/tmp" && pwd)  # absolute: the server's log must land here, whatever OUT is
rm -f "$LOGDIR"/tritonserver-*.log  # a log of an earlier run must not decide this one

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: expected an NVIDIA GPU (nvidia-smi -L); none is visible here" >&2
  exit 2
fi
if [ ! -f "$REPOSITORY/manifest.json" ]; then
  echo "gpu_check: expected a model repository with an installed model set at $REPOSITORY;" \
       "run python build_models.py --variant gpu first" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"

echo "== onnxruntime sessions of the GPU models"
"$PY" - "$REPOSITORY" <<'EOF' | tee "$OUT/sessions.txt"
import sys
from pathlib import Path

import onnxruntime as ort

from comrecycle.runtime.stage import make_session
from comrecycle.serving.layout import installed_versions

repo = Path(sys.argv[1])
print(f"onnxruntime {ort.__version__}, providers offered: {ort.get_available_providers()}")
on_cpu = []
for model in ("retrieval", "prerank", "rank", "rerank", "estimator"):
    versions = installed_versions(repo / model, "model.onnx")
    if not versions:
        sys.exit(f"{repo / model} has no version with model.onnx")
    providers = make_session(repo / model / str(versions[-1]) / "model.onnx", device="gpu").get_providers()
    print(f"{model:9s} v{versions[-1]}: {providers}")
    if "CUDAExecutionProvider" not in providers:
        on_cpu.append(model)
if on_cpu:
    print(f"these GPU models run on the CPU: {on_cpu}")
    sys.exit(1)
EOF

echo "== perf.router_perf on $REPOSITORY"
nvidia-smi dmon -s um -d 1 > "$OUT/nvidia_smi_dmon.txt" 2>&1 &
DMON=$!
trap 'kill $DMON 2>/dev/null || true' EXIT
# TMPDIR: the server's log lands in $OUT/tmp (tritonserver-*.log)
# shellcheck disable=SC2086
TMPDIR="$LOGDIR" "$PY" -m perf.router_perf --repository "$REPOSITORY" --no-install \
  --concurrency ${CONCURRENCY:-1 4 16} --rounds "${ROUNDS:-1}" --measurement-ms "${MEASUREMENT_MS:-6000}" \
  --users "${USERS:-400}" --out "$OUT"
kill $DMON 2>/dev/null || true

shopt -s nullglob
logs=("$LOGDIR"/tritonserver-*.log)
if [ ${#logs[@]} -eq 0 ]; then
  echo "gpu_check: expected the server's log in $LOGDIR; none was written, so the fallback check" \
       "cannot be made" >&2
  exit 1
fi
if grep -l "asked for the CUDA execution provider" "${logs[@]}"; then
  echo "gpu_check: a GPU model fell back to the CPU inside tritonserver (see the log above)" >&2
  exit 1
fi
echo "gpu_check: every GPU model that Triton serves ran on CUDA; results in $OUT/results.md"
