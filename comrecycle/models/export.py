"""Export a stage to ONNX that takes raw int64 ids (the id -> index vocabularies are grafted
into the graph as LabelEncoder nodes), with a dynamic batch axis and dynamic list lengths.

Graph inputs follow comrecycle.specs exactly (names, dtypes, order), so the Triton config,
the Python-backend model and the native onnxruntime backend all see the same interface.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from ..specs import StageSpec
from .vocab import Vocab

IDX = "__idx"
OPSET = 17
ML_OPSET = 2
_ONNX_DTYPE = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT}


def torch_input_names(stage: str) -> list[str]:
    if stage == "retrieval":
        return ["user_id" + IDX, "user_features", "history" + IDX, "request_features", "exclude_items" + IDX]
    return ["user_id" + IDX, "user_features", "history" + IDX, "request_features", "candidates",
            "candidates" + IDX]


def example_inputs(stage: str, batch: int = 2, length: int = 7) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    ex = (torch.randint(0, 3, (batch, 1), generator=g), torch.randint(0, 2, (batch, 3), generator=g),
          torch.randint(0, 5, (batch, length), generator=g), torch.rand(batch, 4, generator=g))
    if stage == "retrieval":
        return ex + (torch.randint(0, 5, (batch, length), generator=g),)
    return ex + (torch.randint(0, 10, (batch, length + 1), generator=g),
                 torch.randint(0, 5, (batch, length + 1), generator=g))


def export_stage(module: torch.nn.Module, spec: StageSpec, user_vocab: Vocab, item_vocab: Vocab,
                 path: str | Path) -> Path:
    """Export `module` (index inputs) and graft the vocabularies so the ONNX takes raw ids."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = torch_input_names(spec.name)
    out_names = [o.name for o in spec.outputs]
    dyn = {n: {0: "batch"} for n in names}
    for n in names:
        if n.startswith(("history", "exclude_items", "candidates")):
            dyn[n][1] = f"len_{n.split(IDX)[0]}"
    for o in out_names:
        dyn[o] = {0: "batch", 1: "k"}
    module.eval()
    tmp = path.with_suffix(".raw.onnx")
    # the TorchScript exporter is deprecated in torch 2.9+ but is the one that keeps the
    # LabelEncoder graft simple and exports dynamic list lengths without tracing guards
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, example_inputs(spec.name), str(tmp), input_names=names,
                          output_names=out_names, dynamic_axes=dyn, opset_version=OPSET, dynamo=False)
    model = onnx.load(str(tmp))
    tmp.unlink()
    model = graft_vocabularies(model, spec, user_vocab, item_vocab)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def graft_vocabularies(model: onnx.ModelProto, spec: StageSpec, user_vocab: Vocab,
                       item_vocab: Vocab) -> onnx.ModelProto:
    vocabs = {"user_id": user_vocab, "history": item_vocab, "exclude_items": item_vocab,
              "candidates": item_vocab}
    return graft(model, spec.inputs, vocabs)


def graft(model: onnx.ModelProto, inputs, vocabs: dict[str, Vocab]) -> onnx.ModelProto:
    """Make the graph take raw ids: for every graph input `X__idx` whose `X` has a vocabulary,
    insert LabelEncoder(X) -> X__idx; then set the graph inputs to exactly `inputs`
    (TensorSpecs, in order; unused ones too)."""
    g = model.graph
    existing = {i.name for i in g.input}
    nodes = []
    for raw, vocab in vocabs.items():
        if raw + IDX in existing:
            nodes.append(vocab.label_encoder(raw, raw + IDX, name=f"vocab_{raw}"))
    new_inputs = []
    for t in inputs:
        shape = ["batch"] + [f"len_{t.name}" if d == -1 else d for d in t.dims]
        new_inputs.append(helper.make_tensor_value_info(t.name, _ONNX_DTYPE[t.dtype], shape))
    del g.input[:]
    g.input.extend(new_inputs)
    for i, n in enumerate(nodes):
        g.node.insert(i, n)
    if not any(o.domain == "ai.onnx.ml" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("ai.onnx.ml", ML_OPSET))
    model.producer_name = "comrecycle"
    return model


def onnx_io_summary(path: str | Path) -> dict[str, list[tuple[str, int, list]]]:
    m = onnx.load(str(path), load_external_data=False)

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return {"inputs": [(i.name, i.type.tensor_type.elem_type, dims(i)) for i in m.graph.input],
            "outputs": [(o.name, o.type.tensor_type.elem_type, dims(o)) for o in m.graph.output]}


def index_inputs(stage: str, ctx: dict[str, np.ndarray], user_vocab: Vocab, item_vocab: Vocab
                 ) -> tuple[torch.Tensor, ...]:
    """Packed raw arrays (batch first) -> the torch module's index inputs (for parity tests)."""
    t = [torch.from_numpy(user_vocab.index(ctx["user_id"])), torch.from_numpy(ctx["user_features"]),
         torch.from_numpy(item_vocab.index(ctx["history"])), torch.from_numpy(ctx["request_features"])]
    if stage == "retrieval":
        return tuple(t) + (torch.from_numpy(item_vocab.index(ctx["exclude_items"])),)
    return tuple(t) + (torch.from_numpy(ctx["candidates"]), torch.from_numpy(item_vocab.index(ctx["candidates"])))
