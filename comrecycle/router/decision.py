"""The router's decision step: which strategy serves each request of a batch that passed the
request filter (docs/method.md, "The policy").

`LearnedDecision` is what recycle_router deploys: one estimator call for the batch's repeated
requests that can recycle, then the params' rule (comrecycle.rule) on the strategy scores
-(c_j + λ ΔQ̂_ij). Any object with the `Decision` surface can replace it; the simulator plugs in
its logging, oracle and baseline policies there (sim.recycling), so that every policy it
evaluates is served by this router core.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Protocol

import numpy as np

from ..rule import decide, policy_dq
from ..settings import SERVING
from ..specs import N_RECYCLE, UNAVAILABLE_SCORE
from ..runtime.stage import pad_lists
from .batch import Backend, BackendError, BatchReport, RouterRequest
from .params import RouterParams

log = logging.getLogger("comrecycle.router")


class Decision(Protocol):
    async def __call__(self, reqs: list[RouterRequest], backend: Backend, report: BatchReport) -> None:
        """Set `strategy` (one of the request's `available`), `scores` [K+1] and `estimated` of
        each request in `reqs` (those of the batch that are not new sessions, in batch order).
        A request left untouched is served by strategy 0. May raise: the router then serves the
        batch's unanswered requests by strategy 0."""


class LearnedDecision:
    """The estimator's ΔQ̂ and the params' rule, as installed (router.params.RouterParams)."""

    def __init__(self, params: RouterParams, seed: int = 0):
        self.params = params
        self.costs = np.asarray(params.costs, np.float64)
        self.uses_estimator = params.uses_estimator
        self.rng = np.random.default_rng(seed)  # the ω > 0 rule samples

    async def __call__(self, reqs: list[RouterRequest], backend: Backend, report: BatchReport) -> None:
        rep = [r for r in reqs if r.repeated and r.available[1:].any()]  # only these need a prediction
        if not rep:
            return
        if not self.uses_estimator:
            # λ = 0 and ω = 0: the scores are -c_j whatever ΔQ̂ is, so the estimator is not called
            avail = np.stack([r.available for r in rep])
            choice = decide(np.zeros(avail.shape), avail, self.params.as_decide_params())
            scores = np.where(avail, -self.costs[None, :], UNAVAILABLE_SCORE).astype(np.float32)
            for k, r in enumerate(rep):
                r.strategy, r.scores = int(choice[k]), scores[k]
            return
        size = SERVING.estimator_max_batch
        chunks = [rep[k:k + size] for k in range(0, len(rep), size)]
        try:
            outs = await asyncio.gather(*[backend.infer(
                "estimator", {"user_features": np.stack([r.user_features for r in c]).astype(np.int64),
                              "history": pad_lists([r.history for r in c]),
                              "request_features": np.stack([r.request_features for r in c]),
                              "cache_state": np.stack([r.cache_state for r in c])},
                ["delta_q"], self.params.estimator_version) for c in chunks])
            dq = np.concatenate([np.asarray(o["delta_q"], np.float64).reshape(len(c), N_RECYCLE)
                                 for o, c in zip(outs, chunks)])
        except Exception as e:  # noqa: BLE001 - a failed or malformed estimator answer: strategy 0
            report.estimator_failures += len(rep)
            spent = self.params.estimator_cost * len(rep)  # the call was paid for all the same
            report.compute_spent += spent
            report.compute_saved -= spent
            if isinstance(e, BackendError):
                log.warning("estimator call failed; %d repeated requests served by strategy 0: %s", len(rep), e)
            else:
                log.error("estimator answer unusable (%s: %s); %d repeated requests served by strategy 0",
                          type(e).__name__, e, len(rep))
            return  # initial scores: strategy 0 only
        for r in rep:
            r.estimated = True
        dq = np.concatenate([np.zeros((len(rep), 1)), dq], axis=1)
        avail = np.stack([r.available for r in rep])
        bad = ~np.isfinite(dq).all(axis=1)
        avail[bad, 1:] = False  # a non-finite prediction never recycles
        dq[bad] = 0.0
        rule = self.params.as_decide_params()
        dq = policy_dq(dq, rule)
        choice = decide(dq, avail, rule, seed=int(self.rng.integers(2**31)))
        scores = np.where(avail, -(self.costs[None, :] + self.params.lam * dq), UNAVAILABLE_SCORE).astype(np.float32)
        for k, r in enumerate(rep):
            r.strategy, r.scores = int(choice[k]), scores[k]
