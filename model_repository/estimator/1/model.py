"""The effect-loss estimator on the Python backend: one onnxruntime call per batch.

Thin by design: Triton tensors <-> numpy; the logic is comrecycle.runtime.estimator.
Copied into model_repository/estimator/1/ by build_models.py.
"""
import json
import os
from pathlib import Path

import triton_python_backend_utils as pb_utils

from comrecycle.runtime.estimator import EstimatorRuntime
from comrecycle.runtime.validation import InputError


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
        self.runtime = EstimatorRuntime(path, device=device, threads=threads)

    def execute(self, requests):
        inputs = []
        for request in requests:
            tensors = {}
            for name in self.runtime.input_names:
                t = pb_utils.get_input_tensor_by_name(request, name)
                if t is not None:
                    tensors[name] = t.as_numpy()
            inputs.append(tensors)
        responses = []
        for result in self.runtime.run(inputs):
            if isinstance(result, InputError):
                err = pb_utils.TritonError(str(result), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=err))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(k, v) for k, v in result.items()]))
        return responses
