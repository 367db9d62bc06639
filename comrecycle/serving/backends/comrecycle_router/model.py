"""recycle_router: the clients' entry point (docs/method.md#serving-flow), a Python-backend BLS model.

Thin by design: Triton tensors <-> numpy, BLS calls and metrics. The request filter, the
decision and the cache logic are comrecycle.router (tested without Triton).
Triton runs it for every version of a model with `backend: "comrecycle_router"` (a Python-based
backend), so all versions run the installed package's code and differ only in their params.json.
"""
import logging
import time

import triton_python_backend_utils as pb_utils

from comrecycle.router.batch import BackendError, ServingError
from comrecycle.router.runner import BatchRunner
from comrecycle.router.serving import RouterMetrics, build_router, settings_from_args
from comrecycle.runtime.validation import InputError
from comrecycle.specs import ROUTER_INPUTS

log = logging.getLogger("comrecycle.router")
INPUT_NAMES = frozenset(spec.name for spec in ROUTER_INPUTS)


class BlsBackend:
    """Backend over Triton BLS: one async request per call, every response checked."""

    async def infer(self, model, inputs, outputs, version=-1):
        request = pb_utils.InferenceRequest(
            model_name=model, model_version=int(version), requested_output_names=list(outputs),
            inputs=[pb_utils.Tensor(k, v) for k, v in inputs.items()])
        response = await request.async_exec()
        if response.has_error():
            raise BackendError(f"{model}: {response.error().message()}")
        got = {t.name(): t for t in response.output_tensors()}
        missing = [k for k in outputs if k not in got]
        if missing:
            raise BackendError(f"{model}: the response lacks the outputs {missing}")
        return {k: got[k].as_numpy() for k in outputs}


class TritonPythonModel:
    def initialize(self, args):
        settings = settings_from_args(args)
        self.router = build_router(args, BlsBackend(), settings)
        self.metrics = RouterMetrics(pb_utils, args["model_name"], args["model_version"],
                                     flush_s=settings.metrics_flush_s)
        inflight = settings.max_inflight_batches
        self.runner = BatchRunner(inflight, name=f"router-{args['model_instance_name']}") if inflight > 1 else None

    def execute(self, requests):
        # Each request is answered through its response sender as soon as its strategy group
        # is served (non-decoupled models may do so since Triton 24.07), so a recycled request
        # never waits for the full cascades of its batch, nor for the write-back and metrics.
        serving = self._serve(requests, time.perf_counter())
        if self.runner is None:
            # one batch at a time: the stub runs the returned coroutine to completion, and
            # requests queue in Triton meanwhile, which makes the next batch larger
            return serving
        # max_inflight_batches > 1: the batch runs on this instance's event loop and execute
        # returns at once, so a batch waiting on a full cascade does not hold the instance
        # (submit blocks while that many batches are unanswered)
        self.runner.submit(serving)
        return None

    async def _serve(self, requests, t0):
        senders = [request.get_response_sender() for request in requests]
        answered = [False] * len(requests)
        latencies = []
        # one inputs() call per request (get_input_tensor_by_name fetches the list again for
        # every name); Triton has already rejected names the config does not declare
        inputs = [{t.name(): t.as_numpy() for t in request.inputs() if t.name() in INPUT_NAMES}
                  for request in requests]

        def respond(i, result):
            senders[i].send(self._response(result), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            answered[i] = True
            latencies.append((getattr(result, "strategy", -1), time.perf_counter() - t0))

        report = None
        try:
            _, report = await self.router.serve(inputs, respond)
        except Exception:  # noqa: BLE001 - answered below; raising after answering would answer twice
            log.exception("recycle_router: a batch of %d requests failed", len(requests))
        for i, sent in enumerate(answered):  # never leave a client waiting
            if not sent:
                senders[i].send(self._response(ServingError("recycle_router: internal error, see the server log")),
                                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        if report is not None:
            self.metrics.record(report, latencies)
        return None

    @staticmethod
    def _response(result):
        if isinstance(result, InputError):
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result), pb_utils.TritonError.INVALID_ARG))
        if isinstance(result, ServingError):
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(result), pb_utils.TritonError.INTERNAL))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(k, v) for k, v in result.tensors().items()])

    def finalize(self):
        if self.runner is not None:
            self.runner.close()
        self.metrics.close()
        self.router.close()
