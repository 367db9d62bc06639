"""The logic behind comrecycle/serving/backends/comrecycle_stage/model.py, testable without Triton.

`StageModel.from_triton_args(args)` builds the stage's StageRuntime from the model config that
Triton hands to initialize(); `execute(inputs_per_request)` returns, per request, either a
dict of output arrays or an InputError (-> INVALID_ARG for that request only).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ..runtime.stage import StageResult, StageRuntime
from ..runtime.validation import InputError
from ..specs import CascadeSizes, STAGES, stage_specs
from ..errors import UserError

log = logging.getLogger("comrecycle.stage_model")


class StageModel:
    def __init__(self, runtime: StageRuntime):
        self.runtime = runtime
        self.spec = runtime.spec
        self.input_names = [t.name for t in self.spec.inputs]

    @classmethod
    def from_triton_args(cls, args: dict) -> "StageModel":
        cfg = json.loads(args["model_config"])
        name = cfg["name"]
        if name not in STAGES:
            raise UserError(f"model {name!r} is not a cascade stage; expected one of {STAGES}")
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        onnx_path = version_dir / params.get("onnx_file", "model.onnx")
        if not onnx_path.exists():
            raise FileNotFoundError(f"{onnx_path} not found: build the models first "
                                    f"(python build_models.py) or install a model set")
        sizes = _sizes_from(version_dir, name, int(params["top_k"]), int(params.get("max_candidates", "0")))
        spec = stage_specs(sizes)[name]
        device = params.get("device", "cpu")
        if args.get("model_instance_kind") == "GPU":
            device = "gpu"
        threads = int(os.environ.get("COMRECYCLE_ORT_THREADS", params.get("ort_intra_op_threads", "1")))
        device_id = int(args.get("model_instance_device_id") or 0)
        rt = StageRuntime(spec, onnx_path, device=device, threads=threads, device_id=device_id)
        log.info("stage %s v%s: %s, top_k=%d, device=%s, providers=%s", name, args["model_version"],
                 onnx_path, spec.top_k, device, rt.session.get_providers())
        return cls(rt)

    def execute(self, requests: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray] | InputError]:
        out = []
        for res in self.runtime.run(requests):
            if isinstance(res, InputError):
                out.append(res)
            else:
                assert isinstance(res, StageResult)
                out.append({self.spec.outputs[0].name: res.items, self.spec.outputs[1].name: res.scores})
        return out


def _sizes_from(version_dir: Path, stage: str, top_k: int, max_candidates: int) -> CascadeSizes:
    """Sizes of the installed model set (its manifest), checked against the config."""
    mpath = version_dir / "manifest.json"
    if mpath.exists():
        sizes = CascadeSizes(**json.loads(mpath.read_text())["sizes"])
    else:  # config parameters only
        kw = {s: getattr(CascadeSizes(), s) for s in STAGES}
        kw[stage] = top_k
        if STAGES.index(stage) > 0:
            kw[STAGES[STAGES.index(stage) - 1]] = max_candidates
        sizes = CascadeSizes(**kw)
    if sizes.top_k(stage) != top_k:
        log.warning("stage %s: config top_k=%d but the installed model set has %d (using the model set's)",
                    stage, top_k, sizes.top_k(stage))
    return sizes
