"""An in-process `Backend` for the router: the same StageRuntime / EstimatorRuntime code the
Triton models run, chained like the ensembles. The reference for the router's parity tests
and a Triton-free way to run the router logic (replays, unit tests)."""
from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Sequence

import numpy as np

from ..runtime.estimator_onnx import EstimatorRuntime
from ..runtime.cascade import CONTEXT_NAMES, run_chain
from ..runtime.stage import StageRuntime, load_stage_runtimes
from ..runtime.validation import InputError
from ..specs import ensemble_specs
from .batch import BackendError

# served model -> the stages it runs and the tensor that feeds the first one its candidates
CHAINS = {name: (ens.stages, None if ens.entry is None else ens.entry.name) for name, ens in ensemble_specs().items()}
CHAINS["rerank"] = (("rerank",), "candidates")


class InProcessBackend:
    def __init__(self, stages: dict[str, StageRuntime], estimator: EstimatorRuntime | None = None):
        self.stages, self.estimator = stages, estimator
        # (model, batch size) of the recent calls, for tests; bounded for long-running use
        self.calls: deque[tuple[str, int]] = deque(maxlen=10_000)

    @classmethod
    def load(cls, model_dir: str | Path, estimator_dir: str | Path | None = None) -> "InProcessBackend":
        est = None
        if estimator_dir is not None:
            est = EstimatorRuntime(Path(estimator_dir) / "estimator.onnx")
        return cls(load_stage_runtimes(model_dir), est)

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str],
                    version: int = -1) -> dict[str, np.ndarray]:
        return self.run(model, inputs, outputs)

    def run(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """infer(), synchronously (safe in a worker thread: the runtimes hold no per-call state)."""
        self.calls.append((model, len(next(iter(inputs.values())))))
        if model == "estimator":
            if self.estimator is None:
                raise BackendError("estimator: no estimator loaded")
            res = self.estimator.run([inputs])[0]
            if isinstance(res, InputError):
                raise BackendError(f"estimator: {res}")
            return {k: res[k] for k in outputs}
        if model not in CHAINS:
            raise BackendError(f"unknown model {model!r}")
        stages, entry = CHAINS[model]
        request = {k: inputs[k] for k in CONTEXT_NAMES}
        if entry is None:
            request["exclude_items"] = inputs["exclude_items"]
        else:
            request["candidates"] = inputs[entry]
        (out,) = run_chain(self.stages, stages, [request])
        if isinstance(out, InputError):
            raise BackendError(f"{model}: {out}")
        missing = [k for k in outputs if k not in out]
        if missing:
            raise BackendError(f"{model}: no outputs {missing}")
        return {k: out[k] for k in outputs}
