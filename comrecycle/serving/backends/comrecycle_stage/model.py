"""A cascade stage (retrieval, prerank, rank or rerank) on the Python backend.

Thin by design: Triton tensors <-> numpy. Validation, batching into one onnxruntime call and
unpacking live in comrecycle.serving.stage_model (tested without Triton).
Triton runs it for every model with `backend: "comrecycle_stage"` (a Python-based backend).
"""
import triton_python_backend_utils as pb_utils

from comrecycle.serving.stage_model import StageModel
from comrecycle.serving.triton_bridge import execute_batch


class TritonPythonModel:
    def initialize(self, args):
        self.model = StageModel.from_triton_args(args)

    def execute(self, requests):
        return execute_batch(pb_utils, requests, self.model.input_names, self.model.execute)
