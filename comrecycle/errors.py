"""The one base of the errors ComRecycle raises on purpose, with user errors apart from failures.

    ComRecycleError
    ├── UserError (also a ValueError): an input, a file or a setting is not what was expected;
    │   the message says what was expected and what arrived. The CLI prints it on one line and
    │   exits 2; a served request gets INVALID_ARG (runtime.validation.InputError).
    └── ServingFailure (also a RuntimeError): a part failed at run time (tritonserver,
        redis-server, a model call, perf_analyzer); the message names the part and its own
        error. The CLI prints it and exits 1.

Anything else that escapes (a plain ValueError from numpy, a KeyError) is a bug: the CLI lets
it through with its traceback rather than calling it bad input.
"""
from __future__ import annotations


class ComRecycleError(Exception):
    """Base of every error ComRecycle raises on purpose."""


class UserError(ComRecycleError, ValueError):
    """An input, file or setting that cannot be used (says what was expected and what arrived)."""


class ServingFailure(ComRecycleError, RuntimeError):
    """A serving part (server, cache, model call, benchmark tool) failed at run time."""
