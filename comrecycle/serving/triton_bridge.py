"""Triton tensors <-> numpy for the thin Python-backend model.py files.

`execute_batch` reads each request's named inputs, calls `run(list of dicts)` once for the
whole batch, and turns each result into a response: a dict of arrays -> output tensors, an
InputError -> a per-request INVALID_ARG error (the other requests are unaffected).
"""
from __future__ import annotations

from typing import Callable, Sequence

from ..runtime.validation import InputError


def execute_batch(pb_utils, requests, input_names: Sequence[str], run: Callable[[list], list]):
    inputs = []
    for request in requests:
        tensors = {}
        for name in input_names:
            t = pb_utils.get_input_tensor_by_name(request, name)
            if t is not None:
                tensors[name] = t.as_numpy()
        inputs.append(tensors)
    responses = []
    for result in run(inputs):
        if isinstance(result, InputError):
            err = pb_utils.TritonError(str(result), pb_utils.TritonError.INVALID_ARG)
            responses.append(pb_utils.InferenceResponse(error=err))
        else:
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(k, v) for k, v in result.items()]))
    return responses
