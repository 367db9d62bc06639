"""The effect-loss estimator on the Python backend: one onnxruntime call per batch.

Thin by design: Triton tensors <-> numpy; the logic is comrecycle.runtime.estimator_onnx.
Triton runs it for every model with `backend: "comrecycle_estimator"` (a Python-based backend).
"""
import json
import os
from pathlib import Path

import triton_python_backend_utils as pb_utils

from comrecycle.runtime.estimator_onnx import EstimatorRuntime
from comrecycle.serving.triton_bridge import execute_batch


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        path = Path(args["model_repository"]) / args["model_version"] / params.get("onnx_file", "model.onnx")
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: train the estimator and install it "
                                    f"(comrecycle train-estimator ... --install)")
        device = "gpu" if args.get("model_instance_kind") == "GPU" else params.get("device", "cpu")
        threads = int(os.environ.get("COMRECYCLE_ORT_THREADS", params.get("ort_intra_op_threads", "1")))
        self.runtime = EstimatorRuntime(path, device=device, threads=threads,
                                        device_id=int(args.get("model_instance_device_id") or 0))

    def execute(self, requests):
        return execute_batch(pb_utils, requests, self.runtime.input_names, self.runtime.run)
