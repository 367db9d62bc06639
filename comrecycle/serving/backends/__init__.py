"""ComRecycle's Triton Python-based backends: one model.py per kind of model.

A model whose config says ``backend: "comrecycle_stage"`` is served by Triton's Python backend
with the file ``<backend-directory>/comrecycle_stage/model.py`` (Triton's "Python-based
backends"), so the four stages share one model.py, and every version of `estimator` and
`recycle_router` runs the code of the installed `comrecycle` package: a model repository holds
configs, weights and params, never code.

- ``comrecycle_stage``: retrieval, prerank, rank, rerank (their ONNX file with onnxruntime)
- ``comrecycle_estimator``: the effect-loss estimator (its ONNX file with onnxruntime)
- ``comrecycle_router``: recycle_router, the BLS model that recycles cached stage outputs

The launcher (comrecycle.serving.server.backend_directory) links these folders into the backend
directory it assembles. For the official Triton container, copy them next to its ``python``
backend (``/opt/tritonserver/backends/``), e.g. with ``install_backends``.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, List
from ...errors import UserError

SOURCE_DIR = Path(__file__).resolve().parent
STAGE_BACKEND = "comrecycle_stage"
ESTIMATOR_BACKEND = "comrecycle_estimator"
ROUTER_BACKEND = "comrecycle_router"
BACKENDS = (STAGE_BACKEND, ESTIMATOR_BACKEND, ROUTER_BACKEND)


def model_py(backend: str) -> Path:
    """The model.py of one of BACKENDS."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return SOURCE_DIR / backend / "model.py"


def backend_sources() -> Dict[str, Path]:
    """{backend name: its model.py} for every backend."""
    return {b: model_py(b) for b in BACKENDS}


def install_backends(dest: str | Path, link: bool = True) -> List[Path]:
    """Create ``dest/<backend>/model.py`` for every backend (a symlink to this package's file, so
    an upgrade of the package is what the server runs; a copy when ``link`` is false or links
    fail). Returns the created files. ``dest`` is a Triton backend directory."""
    dest = Path(dest)
    out = []
    for name, src in backend_sources().items():
        target = dest / name / "model.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        try:
            if not link:
                raise OSError("copy asked for")
            target.symlink_to(src)
        except OSError:
            shutil.copyfile(src, target)
        out.append(target)
    return out
