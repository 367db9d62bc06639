"""A cascade stage (retrieval, prerank, rank or rerank) on the Python backend.

Thin by design: Triton tensors <-> numpy. Validation, batching into one onnxruntime call and
unpacking live in comrecycle.serving.stage_model (tested without Triton).
Copied into model_repository/<stage>/1/ by build_models.py.
"""
import triton_python_backend_utils as pb_utils

from comrecycle.runtime.validation import InputError
from comrecycle.serving.stage_model import StageModel


class TritonPythonModel:
    def initialize(self, args):
        self.model = StageModel.from_triton_args(args)

    def execute(self, requests):
        inputs = []
        for request in requests:
            tensors = {}
            for name in self.model.input_names:
                t = pb_utils.get_input_tensor_by_name(request, name)
                if t is not None:
                    tensors[name] = t.as_numpy()
            inputs.append(tensors)
        responses = []
        for result in self.model.execute(inputs):
            if isinstance(result, InputError):
                err = pb_utils.TritonError(str(result), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=err))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(k, v) for k, v in result.items()]))
        return responses
