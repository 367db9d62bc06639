"""Per-request input checks. A bad request gets an InputError naming what was expected and
what arrived; it never fails the other requests of its batch.

Triton itself already rejects a wrong datatype or a wrong fixed dimension before the model
runs; these checks also cover what Triton cannot know: value rules (ids >= 0, finite floats),
list lengths, missing inputs, and calls made in-process.
"""
from __future__ import annotations

import numpy as np

from ..specs import TensorSpec


class InputError(ValueError):
    """A client error in one request (maps to Triton's INVALID_ARG)."""


def check_tensor(model: str, spec: TensorSpec, value: np.ndarray | None) -> int:
    """Validate one input of one request (batch dim first). Returns the request's batch size."""
    where = f"model '{model}', input '{spec.name}'"
    want_shape = "[batch, " + ", ".join("n" if d == -1 else str(d) for d in spec.dims) + "]"
    if value is None:
        raise InputError(f"{where}: missing; expected {spec.wire_dtype} {want_shape} ({spec.doc})")
    if value.dtype != spec.np_dtype:
        raise InputError(f"{where}: expected dtype {spec.wire_dtype}, got {value.dtype}")
    if value.ndim != len(spec.dims) + 1:
        raise InputError(f"{where}: expected shape {want_shape}, got {list(value.shape)}")
    if value.shape[0] < 1:
        raise InputError(f"{where}: empty batch dimension")
    for axis, d in enumerate(spec.dims, start=1):
        if d != -1 and value.shape[axis] != d:
            raise InputError(f"{where}: expected shape {want_shape}, got {list(value.shape)}")
    if spec.variable:
        n = value.shape[-1]
        if n < spec.min_len:
            raise InputError(f"{where}: expected at least {spec.min_len} item id(s), got an empty list")
        if spec.max_len is not None and n > spec.max_len:
            raise InputError(f"{where}: expected at most {spec.max_len} item ids, got {n}")
    if spec.nonnegative and value.size and value.min() < 0:
        raise InputError(f"{where}: ids and codes must be >= 0, got {int(value.min())}")
    if spec.finite and value.size and not np.isfinite(value).all():
        bad = value[~np.isfinite(value)][0]
        raise InputError(f"{where}: expected finite values, got {bad}")
    return int(value.shape[0])


def check_request(model: str, specs: tuple[TensorSpec, ...], tensors: dict[str, np.ndarray]) -> int:
    """Validate all inputs of one request; they must agree on the batch size."""
    sizes = {s.name: check_tensor(model, s, tensors.get(s.name)) for s in specs}
    if len(set(sizes.values())) > 1:
        raise InputError(f"model '{model}': inputs disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))
