"""Per-request input checks. A bad request gets an InputError naming what was expected and
what arrived; it never fails the other requests of its batch.

Triton itself already rejects a wrong datatype or a wrong fixed dimension before the model
runs; these checks also cover what Triton cannot know: value rules (ids >= 0, finite floats),
list lengths, missing inputs, and calls made in-process.
"""
from __future__ import annotations

import numpy as np

from ..specs import PAD_ID, TensorSpec
from ..errors import UserError


class InputError(UserError):
    """A client error in one request (maps to Triton's INVALID_ARG)."""


def check_tensor(model: str, spec: TensorSpec, value: np.ndarray | None) -> int:
    """Validate one input of one request (batch dim first). Returns the request's batch size.

    Runs once per input of every request on the serving path: the error texts are built only
    when a check fails, and the value checks of valid small tensors stay in numpy."""
    def where() -> str:
        return f"model '{model}', input '{spec.name}'"

    def want_shape() -> str:
        return "[batch, " + ", ".join("n" if d == -1 else str(d) for d in spec.dims) + "]"

    if value is None:
        raise InputError(f"{where()}: missing; expected {spec.wire_dtype} {want_shape()} ({spec.doc})")
    if value.dtype != spec.np_dtype:
        raise InputError(f"{where()}: expected dtype {spec.wire_dtype}, got {value.dtype}")
    shape = value.shape
    if len(shape) != len(spec.dims) + 1:
        raise InputError(f"{where()}: expected shape {want_shape()}, got {list(shape)}")
    if shape[0] < 1:
        raise InputError(f"{where()}: empty batch dimension")
    for axis, d in enumerate(spec.dims, start=1):
        if d != -1 and shape[axis] != d:
            raise InputError(f"{where()}: expected shape {want_shape()}, got {list(shape)}")
    lowest = value.min() if (spec.nonnegative and value.size) else 0
    if spec.variable and spec.nonnegative and lowest >= 0:
        _check_lengths(where, spec, shape[-1], shape[-1])  # the common case: no padding
    elif spec.variable and spec.nonnegative:
        # dense [batch, n] id lists: rows may end with PAD_ID padding (specs: "Padding")
        pad = value == PAD_ID
        if value.size and (pad[..., :-1] & ~pad[..., 1:]).any():
            raise InputError(f"{where()}: padding ({PAD_ID}) is allowed only at the end of a row, "
                             f"got an id after a {PAD_ID}")
        real = value[~pad]
        if real.size and real.min() < 0:
            raise InputError(f"{where()}: ids and codes must be >= 0, got {int(real.min())} "
                             f"({PAD_ID} may only pad the end of a row)")
        lengths = (~pad).sum(axis=-1)  # [batch], zeros for a [batch, 0] tensor
        _check_lengths(where, spec, int(lengths.min()), int(lengths.max()))
    elif spec.variable:
        _check_lengths(where, spec, shape[-1], shape[-1])
    if spec.nonnegative and not spec.variable and lowest < 0:
        raise InputError(f"{where()}: ids and codes must be >= 0, got {int(lowest)}")
    if spec.finite and value.size and not np.isfinite(value).all():
        bad = value[~np.isfinite(value)][0]
        raise InputError(f"{where()}: expected finite values, got {bad}")
    return int(shape[0])


def _check_lengths(where, spec: TensorSpec, shortest: int, longest: int) -> None:
    """where: a callable giving the input's name for the error text."""
    if shortest < spec.min_len:
        raise InputError(f"{where()}: expected at least {spec.min_len} item id(s), got "
                         f"{'an empty list' if shortest == 0 else shortest}")
    if spec.max_len is not None and longest > spec.max_len:
        raise InputError(f"{where()}: expected at most {spec.max_len} item ids, got {longest}")


def check_request(model: str, specs: tuple[TensorSpec, ...], tensors: dict[str, np.ndarray]) -> int:
    """Validate all inputs of one request; they must agree on the batch size."""
    sizes = {s.name: check_tensor(model, s, tensors.get(s.name)) for s in specs}
    if len(set(sizes.values())) > 1:
        raise InputError(f"model '{model}': inputs disagree on the batch size: {sizes}")
    return next(iter(sizes.values()))
