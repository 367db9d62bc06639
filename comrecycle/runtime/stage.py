"""Run one cascade stage for a batch of requests with a single onnxruntime call.

Requests are validated one by one; the valid ones are packed (variable-length id lists padded
with PAD_ID to the batch's longest, at least one column), scored together, and unpacked.
Rows whose output has fewer than top_k real items (short candidate lists) are trimmed.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..specs import PAD_ID, StageSpec
from .validation import InputError, check_request

LOG = logging.getLogger(__name__)


def make_session(onnx_path: str | Path, device: str = "cpu", threads: int = 1, device_id: int = 0):
    """An onnxruntime session; device "gpu" asks for the CUDA execution provider on GPU
    `device_id` (the Triton instance's GPU). onnxruntime falls back to the CPU when CUDA cannot
    be loaded (no onnxruntime-gpu, a CUDA or cuDNN library missing): that is logged as a warning
    naming the providers available, so a GPU model that runs on the CPU is visible in the log."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if device == "gpu":
        providers = [("CUDAExecutionProvider", {"device_id": int(device_id)}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
    if device == "gpu" and "CUDAExecutionProvider" not in session.get_providers():
        LOG.warning("%s: asked for the CUDA execution provider on GPU %d but runs on %s "
                    "(onnxruntime %s offers %s; a GPU model needs onnxruntime-gpu and CUDA's libraries)",
                    onnx_path, device_id, session.get_providers(), ort.__version__,
                    ort.get_available_providers())
    return session


def pad_lists(rows: list[np.ndarray], min_width: int = 1) -> np.ndarray:
    """Stack 1-D or 2-D (rows x n) int64 arrays into [R, W], padded with PAD_ID."""
    mats = [r if r.ndim == 2 else r.reshape(1, -1) for r in rows]
    width = max([min_width] + [m.shape[1] for m in mats])
    out = np.full((sum(m.shape[0] for m in mats), width), PAD_ID, dtype=np.int64)
    r = 0
    for m in mats:
        out[r:r + m.shape[0], :m.shape[1]] = m
        r += m.shape[0]
    return out


@dataclass
class StageResult:
    items: np.ndarray  # [n, k] int64
    scores: np.ndarray  # [n, k] float32


class StageRuntime:
    """A stage: its spec (comrecycle.specs) and its ONNX session."""

    def __init__(self, spec: StageSpec, onnx_path: str | Path, device: str = "cpu", threads: int = 1,
                 device_id: int = 0):
        self.spec = spec
        self.session = make_session(onnx_path, device=device, threads=threads, device_id=device_id)
        self.onnx_inputs = {i.name for i in self.session.get_inputs()}
        missing = [t.name for t in spec.inputs if t.name not in self.onnx_inputs]
        if missing:
            raise RuntimeError(f"{onnx_path}: ONNX model lacks inputs {missing} of stage '{spec.name}'")

    def run(self, requests: list[dict[str, np.ndarray]]) -> list[StageResult | InputError]:
        """requests: one dict per request, tensors batch-first ([n, ...]); one result each."""
        results: list[StageResult | InputError | None] = [None] * len(requests)
        valid, sizes = [], []
        for i, req in enumerate(requests):
            try:
                sizes.append(check_request(self.spec.name, self.spec.inputs, req))
                valid.append(i)
            except InputError as e:
                results[i] = e
        if valid:
            feeds = {}
            for t in self.spec.inputs:
                rows = [requests[i][t.name] for i in valid]
                feeds[t.name] = pad_lists(rows) if t.variable else np.concatenate(rows, axis=0)
            items, scores = self.session.run([o.name for o in self.spec.outputs], feeds)
            r = 0
            for i, n in zip(valid, sizes):
                it, sc = items[r:r + n], scores[r:r + n]
                keep = int(np.isfinite(sc).sum(axis=1).max())
                results[i] = StageResult(it[:, :keep], sc[:, :keep])
                r += n
        return results  # type: ignore[return-value]


def load_stage_runtimes(model_dir: str | Path, device: str = "cpu", threads: int | None = None
                        ) -> dict[str, StageRuntime]:
    """The four stages of a built model set (a directory written by build_models.py)."""
    from ..specs import CascadeSizes, STAGES, stage_specs

    model_dir = Path(model_dir)
    manifest_path = model_dir / "manifest.json"
    if not manifest_path.exists():
        raise FileNotFoundError(f"{model_dir} is not a model set: no manifest.json (run build_models.py)")
    manifest = json.loads(manifest_path.read_text())
    specs = stage_specs(CascadeSizes(**manifest["sizes"]))
    threads = threads or int(os.environ.get("COMRECYCLE_ORT_THREADS", "1"))
    return {s: StageRuntime(specs[s], model_dir / f"{s}.onnx", device=device, threads=threads)
            for s in STAGES}
