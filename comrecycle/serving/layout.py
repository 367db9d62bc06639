"""The layout of a model repository on disk: which versions of a model are installed."""
from __future__ import annotations

from pathlib import Path


def installed_versions(model_dir: str | Path, needs: str) -> list[int]:
    """Sorted version numbers of a served model whose version dir holds the file `needs`
    (model.onnx, params.json); [] when the model dir does not exist."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(v.name) for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit() and (v / needs).exists())
