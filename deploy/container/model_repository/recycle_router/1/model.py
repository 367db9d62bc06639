"""recycle_router: the clients' entry point (DESIGN.md §2-3), a Python-backend BLS model.

Thin by design: Triton tensors <-> numpy, BLS calls and metrics. The request filter, the
decision and the cache logic are comrecycle.router (tested without Triton).
Copied into model_repository/recycle_router/<version>/ by comrecycle.repository.
"""
import asyncio
import time

import triton_python_backend_utils as pb_utils

from comrecycle.router.core import BackendError, ServingError
from comrecycle.router.serving import RouterMetrics, build_router
from comrecycle.runtime.validation import InputError
from comrecycle.specs import ROUTER_INPUTS


class BlsBackend:
    """Backend over Triton BLS: one async request per call, every response checked."""

    async def infer(self, model, inputs, outputs, version=-1):
        request = pb_utils.InferenceRequest(
            model_name=model, model_version=int(version), requested_output_names=list(outputs),
            inputs=[pb_utils.Tensor(k, v) for k, v in inputs.items()])
        response = await request.async_exec()
        if response.has_error():
            raise BackendError(f"{model}: {response.error().message()}")
        return {k: pb_utils.get_output_tensor_by_name(response, k).as_numpy() for k in outputs}


class TritonPythonModel:
    def initialize(self, args):
        self.router = build_router(args, BlsBackend())
        self.metrics = RouterMetrics(pb_utils, args["model_name"], args["model_version"])

    async def execute(self, requests):
        t0 = time.perf_counter()
        inputs = []
        for request in requests:
            tensors = {}
            for spec in ROUTER_INPUTS:
                t = pb_utils.get_input_tensor_by_name(request, spec.name)
                if t is not None:
                    tensors[spec.name] = t.as_numpy()
            inputs.append(tensors)
        results, report = await self.router.serve(inputs)
        responses = []
        for result in results:
            if isinstance(result, InputError):
                err = pb_utils.TritonError(str(result), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=err))
            elif isinstance(result, ServingError):
                err = pb_utils.TritonError(str(result), pb_utils.TritonError.INTERNAL)
                responses.append(pb_utils.InferenceResponse(error=err))
            else:
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(k, v) for k, v in result.tensors().items()]))
        self.metrics.record(report, results, time.perf_counter() - t0)
        return responses

    def finalize(self):
        self.router.close()
