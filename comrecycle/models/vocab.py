"""Id vocabularies: arbitrary int64 ids -> dense indices the embeddings use.

Index 0 is padding (PAD_ID = -1), 1 is out-of-vocabulary (an id unseen in training: a cold
start), 2.. are the known ids in sorted order. The same mapping runs in numpy (training) and
inside the exported ONNX graph as an ai.onnx.ml LabelEncoder (serving), so a served model
takes raw ids.
"""
from __future__ import annotations

import numpy as np
from onnx import helper

from ..specs import PAD_ID
from ..errors import UserError

PAD_INDEX, OOV_INDEX, FIRST_INDEX = 0, 1, 2


class Vocab:
    def __init__(self, ids: np.ndarray):
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        if ids.size and ids[0] < 0:
            raise UserError(f"vocabulary ids must be >= 0, got {ids[0]}")
        self.ids = ids

    def __len__(self) -> int:
        return int(self.ids.size)

    def index(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if self.ids.size == 0:
            return np.where(ids == PAD_ID, PAD_INDEX, OOV_INDEX).astype(np.int64)
        pos = np.clip(np.searchsorted(self.ids, ids), 0, self.ids.size - 1)
        known = self.ids[pos] == ids
        out = np.where(known, pos + FIRST_INDEX, OOV_INDEX)
        return np.where(ids == PAD_ID, PAD_INDEX, out).astype(np.int64)

    def label_encoder(self, inp: str, out: str, name: str):
        """The same mapping as an ONNX node (domain ai.onnx.ml, opset 2)."""
        keys = [PAD_ID] + self.ids.tolist()
        values = [PAD_INDEX] + list(range(FIRST_INDEX, FIRST_INDEX + len(self.ids)))
        return helper.make_node("LabelEncoder", [inp], [out], name=name, domain="ai.onnx.ml",
                                keys_int64s=keys, values_int64s=values, default_int64=OOV_INDEX)
