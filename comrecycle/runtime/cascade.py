"""The cascade in-process: the same StageRuntime code the Triton models run, chained.

Used as the reference for the Triton parity test, for the stage-quality report, and as a
`serve` function for the simulator.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..specs import STAGES, STRATEGY_ENTRY_STAGE
from .stage import StageResult, StageRuntime, load_stage_runtimes
from .validation import InputError
from ..errors import UserError

CONTEXT_NAMES = ("user_id", "user_features", "history", "request_features")


def batched(ctx: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One request without batch dim -> tensors with a batch dim of 1."""
    return {k: np.asarray(v)[None, ...] for k, v in ctx.items()}


class InProcessCascade:
    def __init__(self, stages: dict[str, StageRuntime], chunk: int = 16):
        self.stages = stages
        self.chunk = chunk

    @classmethod
    def load(cls, model_dir: str | Path, **kw) -> "InProcessCascade":
        return cls(load_stage_runtimes(model_dir, **kw))

    def run(self, contexts: Sequence[dict[str, np.ndarray]], strategy: int = 0,
            candidates: Sequence[np.ndarray] | None = None) -> list[dict[str, np.ndarray] | InputError]:
        """Serve requests (tensors without batch dim) by `strategy`; for strategy j > 0,
        `candidates` holds each request's cached list of the stage before the entry stage.
        Returns, per request, every computed stage's items and scores (no batch dim)."""
        first = STRATEGY_ENTRY_STAGE[strategy]
        if strategy > 0 and (candidates is None or len(candidates) != len(contexts)):
            raise UserError(f"strategy {strategy} needs one candidate list per request")
        out: list[dict | InputError] = [dict() for _ in contexts]
        for lo in range(0, len(contexts), self.chunk):
            idx = list(range(lo, min(lo + self.chunk, len(contexts))))
            cand = {i: np.asarray(candidates[i], np.int64) for i in idx} if strategy > 0 else {}
            for stage in STAGES[STAGES.index(first):]:
                live = [i for i in idx if isinstance(out[i], dict)]
                if not live:
                    break
                reqs = []
                for i in live:
                    ctx = {k: contexts[i][k] for k in CONTEXT_NAMES if k in contexts[i]}
                    if stage == "retrieval":
                        ctx["exclude_items"] = contexts[i].get("exclude_items", np.zeros(0, np.int64))
                    else:
                        ctx["candidates"] = cand[i]
                    reqs.append(batched(ctx))
                for i, res in zip(live, self.stages[stage].run(reqs)):
                    if isinstance(res, InputError):
                        out[i] = res
                        continue
                    assert isinstance(res, StageResult)
                    out[i][f"{stage}_items"] = res.items[0]
                    out[i][f"{stage}_scores"] = res.scores[0]
                    cand[i] = res.items[0]
        return out

    def serve_pages(self, batch) -> list[np.ndarray]:
        """A simulator `serve` function: full cascade for every request of a RequestBatch."""
        res = self.run([batch.context(i) for i in range(len(batch))])
        return [r["rerank_items"] if isinstance(r, dict) else np.zeros(0, np.int64) for r in res]
