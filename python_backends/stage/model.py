"""A cascade stage (retrieval, prerank, rank or rerank) on the Python backend.

Thin by design: Triton tensors <-> numpy. Validation, batching into one onnxruntime call and
unpacking live in comrecycle.serving.stage_model (tested without Triton).
Copied into model_repository/<stage>/1/ by build_models.py.
"""
import triton_python_backend_utils as pb_utils

from comrecycle.serving.stage_model import StageModel
from comrecycle.serving.triton_bridge import execute_batch


class TritonPythonModel:
    def initialize(self, args):
        self.model = StageModel.from_triton_args(args)

    def execute(self, requests):
        return execute_batch(pb_utils, requests, self.model.input_names, self.model.execute)
