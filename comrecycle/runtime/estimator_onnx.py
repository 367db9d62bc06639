"""Serve the effect-loss estimator: validation and one onnxruntime call per batch.

Same contract as a stage (runtime/stage.py): per-request InputError for bad requests, the
valid ones scored together; history lists padded with PAD_ID to the batch's longest.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..specs import ESTIMATOR_INPUTS, ESTIMATOR_OUTPUTS
from .stage import make_session, pad_lists
from .validation import InputError, check_request


class EstimatorRuntime:
    name = "estimator"

    def __init__(self, onnx_path: str | Path, device: str = "cpu", threads: int = 1, device_id: int = 0):
        self.session = make_session(onnx_path, device=device, threads=threads, device_id=device_id)
        names = {i.name for i in self.session.get_inputs()}
        missing = [t.name for t in ESTIMATOR_INPUTS if t.name not in names]
        if missing:
            raise RuntimeError(f"{onnx_path}: ONNX model lacks estimator inputs {missing}")
        self.input_names = [t.name for t in ESTIMATOR_INPUTS]
        self.output_names = [t.name for t in ESTIMATOR_OUTPUTS]

    def run(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray] | InputError]:
        results: list = [None] * len(requests)
        valid, sizes = [], []
        for i, req in enumerate(requests):
            try:
                sizes.append(check_request(self.name, ESTIMATOR_INPUTS, req))
                valid.append(i)
            except InputError as e:
                results[i] = e
        if valid:
            feeds = {t.name: (pad_lists([requests[i][t.name] for i in valid]) if t.variable
                              else np.concatenate([requests[i][t.name] for i in valid]))
                     for t in ESTIMATOR_INPUTS}
            outs = self.session.run(self.output_names, feeds)
            r = 0
            for i, n in zip(valid, sizes):
                results[i] = {name: o[r:r + n] for name, o in zip(self.output_names, outs)}
                r += n
        return results
