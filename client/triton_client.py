"""Async HTTP / gRPC client for the ComRecycle models (tensor names from comrecycle.specs).

    async with CascadeClient("127.0.0.1:8001", "grpc") as c:
        page = await c.page(context)            # full cascade -> item ids of the page
        out = await c.infer("cascade", context)  # every output, numpy arrays without batch dim

Requests carry one user each (batch dim 1); Triton's dynamic batcher does the batching.
Server-side errors surface as ServingError with Triton's message (e.g. INVALID_ARG text).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from comrecycle.specs import (CONTEXT, ESTIMATOR_INPUTS, ESTIMATOR_OUTPUTS, EXCLUDE_ITEMS, ROUTER, ROUTER_INPUTS,
                              ROUTER_OUTPUTS, STAGES, ensemble_specs, items_out, scores_out)
from comrecycle.errors import ServingFailure, UserError

PROTOCOLS = ("grpc", "http")


class ServingError(ServingFailure):
    """A request the server answered with an error."""


class ServerUnreachable(ServingFailure, ConnectionError):
    """The server (or the model) cannot be used at all: one line that names the URL, the protocol and
    the first error, instead of one failed request per replayed page."""


def _first_line(exc: BaseException) -> str:
    text = exc.message() if isinstance(exc, InferenceServerException) else str(exc)
    text = (text or type(exc).__name__).strip().splitlines()
    return text[0] if text else type(exc).__name__


# Transport failures (refused connection, DNS, reset) as the gRPC and HTTP clients raise them.
try:  # aiohttp comes with tritonclient[http]
    from aiohttp import ClientError as _HttpClientError
except ImportError:  # pragma: no cover
    _HttpClientError = OSError
TRANSPORT_ERRORS = (OSError, _HttpClientError, asyncio.TimeoutError)


def model_inputs(model: str) -> list[str]:
    """Input tensor names of a served model (ensemble or stage)."""
    if model == "estimator":
        return [t.name for t in ESTIMATOR_INPUTS]
    if model == ROUTER:
        return [t.name for t in ROUTER_INPUTS]
    ctx = [t.name for t in CONTEXT]
    ens = ensemble_specs()
    if model in ens:
        e = ens[model]
        return ctx + ([EXCLUDE_ITEMS.name] if e.entry is None else [e.entry.name])
    if model == "retrieval":
        return ctx + [EXCLUDE_ITEMS.name]
    if model in STAGES:
        return ctx + ["candidates"]
    raise UserError(f"unknown model {model!r}")


def model_outputs(model: str) -> list[str]:
    if model == "estimator":
        return [t.name for t in ESTIMATOR_OUTPUTS]
    if model == ROUTER:
        return [t.name for t in ROUTER_OUTPUTS]
    ens = ensemble_specs()
    stages = ens[model].stages if model in ens else (model,)
    return [n for s in stages for n in (items_out(s).name, scores_out(s).name)]


@dataclass
class Timed:
    outputs: dict[str, np.ndarray] | None
    seconds: float
    error: str | None = None


class CascadeClient:
    def __init__(self, url: str, protocol: str = "grpc", timeout_s: float = 30.0):
        if protocol not in PROTOCOLS:
            raise UserError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.url, self.protocol, self.timeout_s = url, protocol, timeout_s
        if protocol == "grpc":
            import tritonclient.grpc.aio as mod
            self._client = mod.InferenceServerClient(url)
        else:
            import tritonclient.http.aio as mod
            self._client = mod.InferenceServerClient(url, conn_limit=256)
        self._mod = mod

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self):
        await self._client.close()

    async def ready(self, model: str | None = None) -> bool:
        if model is None:
            return bool(await self._client.is_server_ready())
        return bool(await self._client.is_model_ready(model))

    async def check(self, model: str) -> None:
        """Raise ServerUnreachable unless the server answers and ``model`` is ready to serve."""
        where = f"tritonserver at {self.url} over {self.protocol}"
        try:
            live = await asyncio.wait_for(self._client.is_server_live(), self.timeout_s)
        except (InferenceServerException, *TRANSPORT_ERRORS) as e:
            raise ServerUnreachable(f"cannot reach {where}: {_first_line(e)} (is `comrecycle serve` running, "
                                    f"and is {self.url} its {self.protocol.upper()} port?)") from None
        if not live:
            raise ServerUnreachable(f"{where} answers but is not live")
        try:
            ready = await self._client.is_model_ready(model)
        except (InferenceServerException, *TRANSPORT_ERRORS) as e:
            raise ServerUnreachable(f"{where}: readiness of model {model!r} unknown: {_first_line(e)}") from None
        if not ready:
            raise ServerUnreachable(f"{where} answers, but model {model!r} is not loaded or not ready "
                                    f"(`comrecycle serve` logs every model it did not load, and why)")

    def _inputs(self, model: str, tensors: dict[str, np.ndarray]):
        ins = []
        optional = {t.name for t in ROUTER_INPUTS if t.optional} if model == ROUTER else set()
        for name in model_inputs(model):
            if name not in tensors and name in optional:
                continue
            if name not in tensors:
                raise UserError(f"model {model!r} needs input {name!r}; got {sorted(tensors)}")
            v = np.asarray(tensors[name])[None, ...]
            t = self._mod.InferInput(name, list(v.shape), np_to_triton_dtype(v.dtype))
            t.set_data_from_numpy(v) if self.protocol == "grpc" else t.set_data_from_numpy(v, binary_data=True)
            ins.append(t)
        return ins

    def _outputs(self, model: str):
        if self.protocol == "grpc":
            return [self._mod.InferRequestedOutput(n) for n in model_outputs(model)]
        return [self._mod.InferRequestedOutput(n, binary_data=True) for n in model_outputs(model)]

    async def infer(self, model: str, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request (tensors without batch dim) -> outputs without batch dim."""
        try:
            if self.protocol == "grpc":
                res = await self._client.infer(model, self._inputs(model, tensors), outputs=self._outputs(model),
                                               client_timeout=self.timeout_s)
            else:
                res = await self._client.infer(model, self._inputs(model, tensors), outputs=self._outputs(model))
        except InferenceServerException as e:
            raise ServingError(f"{model}: {e.message() if hasattr(e, 'message') else e}") from e
        return {n: res.as_numpy(n)[0] for n in model_outputs(model)}

    async def timed_infer(self, model: str, tensors: dict[str, np.ndarray]) -> Timed:
        t0 = time.perf_counter()
        try:
            out = await self.infer(model, tensors)
            return Timed(out, time.perf_counter() - t0)
        except ServingError as e:
            return Timed(None, time.perf_counter() - t0, str(e))
        except TRANSPORT_ERRORS as e:  # the server went away mid-run: one failed request, with the reason
            return Timed(None, time.perf_counter() - t0, f"{model}: {type(e).__name__}: {_first_line(e)}")

    async def page(self, context: dict[str, np.ndarray]) -> np.ndarray:
        """The page (item ids, best first) of the full cascade for one request."""
        return (await self.infer("cascade", context))["rerank_items"]
