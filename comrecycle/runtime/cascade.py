"""The cascade in-process: the same StageRuntime code the Triton models run, chained.

Used as the reference for the Triton parity test, for the stage-quality report, and as a
`serve` function for the simulator.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..specs import STAGES, STRATEGY_ENTRY_STAGE
from .stage import StageResult, StageRuntime, load_stage_runtimes
from .validation import InputError
from ..errors import UserError

CONTEXT_NAMES = ("user_id", "user_features", "history", "request_features")


def batched(ctx: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One request without batch dim -> tensors with a batch dim of 1."""
    return {k: np.asarray(v)[None, ...] for k, v in ctx.items()}


def run_chain(stages: Mapping[str, StageRuntime], chain: Sequence[str],
              requests: Sequence[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray] | InputError]:
    """Run consecutive stages `chain` (e.g. ("rank", "rerank")) on requests, each stage's items
    feeding the next: one StageRuntime.run call per stage for all requests, as the ensembles do.

    requests: dicts of batch-first tensors ([n, ...]): the context, plus `exclude_items` when the
    chain starts at retrieval or `candidates` (the cached list) for its first stage otherwise.
    Returns per request {<stage>_items, <stage>_scores} ([n, k]) or the InputError that stopped it.
    The in-process cascade (simulator, build) and the router's in-process backend both run this."""
    out: list[dict | InputError] = [dict() for _ in requests]
    cand = {i: r.get("candidates") for i, r in enumerate(requests)}
    for stage in chain:
        live = [i for i in range(len(requests)) if isinstance(out[i], dict)]
        if not live:
            break
        feeds = []
        for i in live:
            feed = {k: requests[i][k] for k in CONTEXT_NAMES if k in requests[i]}
            if stage == "retrieval":
                feed["exclude_items"] = requests[i].get("exclude_items", np.zeros((1, 0), np.int64))
            else:
                feed["candidates"] = cand[i]
            feeds.append(feed)
        for i, res in zip(live, stages[stage].run(feeds)):
            if isinstance(res, InputError):
                out[i] = res
                continue
            assert isinstance(res, StageResult)
            out[i][f"{stage}_items"], out[i][f"{stage}_scores"] = res.items, res.scores
            cand[i] = res.items
    return out


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
        chain = STAGES[STAGES.index(first):]
        out: list[dict | InputError] = []
        for lo in range(0, len(contexts), self.chunk):
            reqs = []
            for i in range(lo, min(lo + self.chunk, len(contexts))):
                req = {k: contexts[i][k] for k in CONTEXT_NAMES if k in contexts[i]}
                if strategy == 0:
                    req["exclude_items"] = contexts[i].get("exclude_items", np.zeros(0, np.int64))
                else:
                    req["candidates"] = np.asarray(candidates[i], np.int64)
                reqs.append(batched(req))
            for res in run_chain(self.stages, chain, reqs):  # one request per row: drop the batch dim
                out.append(res if isinstance(res, InputError) else {k: v[0] for k, v in res.items()})
        return out

    def serve_pages(self, batch) -> list[np.ndarray]:
        """A simulator `serve` function: full cascade for every request of a RequestBatch."""
        res = self.run([batch.context(i) for i in range(len(batch))])
        return [r["rerank_items"] if isinstance(r, dict) else np.zeros(0, np.int64) for r in res]
