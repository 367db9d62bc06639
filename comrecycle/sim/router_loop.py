"""The client in the loop: a simulator `serve` function that asks a router for each page, as a
client does. Used by replays against Triton (client.replay.client_sender), by the in-process
router (`router_sender`), and by the closed loop of the deployed router
(policy.closed_loop.RouterClosedLoop)."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..specs import ROUTER, router_request


@dataclass
class Answer:
    """A router's answer to one request: its output tensors (batch dim dropped) or an error."""
    outputs: dict[str, np.ndarray] | None
    seconds: float
    error: str | None = None


def router_sender(router) -> Callable[[list], list[Answer]]:
    """Requests -> one Timed answer each, from an in-process comrecycle.router.core.RecycleRouter
    (one batch), with the output tensors Triton's recycle_router returns."""
    def send(requests: list[dict[str, np.ndarray]]) -> list[Answer]:
        t0 = time.perf_counter()
        results, _ = asyncio.run(router.serve([{k: v[None] for k, v in r.items()} for r in requests]))
        secs = time.perf_counter() - t0
        return [Answer({k: v[0] for k, v in r.tensors().items()}, secs) if hasattr(r, "tensors") else
                Answer(None, secs, f"{type(r).__name__}: {r}") for r in results]  # InputError, ServingError

    return send


class RouterInTheLoop:
    """A simulator `serve` function that asks a router for each page with the client in the loop:
    each request carries the previous page's viewed and clicked items of its session (with the
    page_token of that page), the simulated time (request_time) and new_session on a session's
    first page. It records, per request, what a RouterReplay holds. `send` answers a batch of
    requests: `client_sender` (Triton) or `router_sender` (an in-process router)."""

    page_output = "page_items"

    def __init__(self, send: Callable[[list], list[Answer]], model: str = ROUTER, record: bool = True):
        """record=False keeps only what the next requests need (no per-request rows: long
        simulations)."""
        self.send, self.model, self.record = send, model, record
        self.feedback: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # session id -> (viewed, clicked)
        self.tokens: dict[int, int] = {}  # session id -> page_token of the page the feedback describes
        self.rows: list[tuple] = []
        self.strategy_of: dict[int, int] = {}  # request id -> the strategy that served it (-1: error)
        self.errors: list[str] = []
        self.contexts: list[dict] = []
        self.interests: list[np.ndarray] = []
        self.pages: list[np.ndarray] = []

    def request(self, batch, i: int) -> dict[str, np.ndarray]:
        ctx = batch.context(i)
        first = not bool(batch.is_repeat[i])
        viewed, clicked = ((),) * 2 if first else self.feedback.get(int(batch.session_id[i]), ((),) * 2)
        # the page_token ties the feedback to the page it describes
        token = None if first else self.tokens.get(int(batch.session_id[i]))
        return router_request(int(ctx["user_id"][0]), ctx["user_features"], ctx["history"], viewed, clicked,
                              request_time=float(batch.ts[i]), new_session=first, page_token=token)

    @property
    def batch_strategies(self) -> list[int]:
        """The strategy of each request of the last batch (-1 where the router answered an error)."""
        return [s for s, _ in self._pending]

    def strategy(self, outputs: dict[str, np.ndarray]) -> int:
        return int(outputs["strategy"][0])

    def __call__(self, batch):
        results = self.send([self.request(batch, i) for i in range(len(batch))])
        pages, self._pending, self._tokens = [], [], []
        for r in results:
            if r.error is not None:
                self.errors.append(r.error)
                pages.append(np.zeros(0, np.int64))
                self._pending.append((-1, r.seconds))
            else:
                pages.append(r.outputs[self.page_output])
                self._pending.append((self.strategy(r.outputs), r.seconds))
            self._tokens.append(None if r.error is not None else self.token(r.outputs))
        return pages

    def token(self, outputs: dict[str, np.ndarray]) -> int | None:
        return int(outputs["page_token"][0])

    def on_feedback(self, batch, outcome) -> None:
        for i in range(len(batch)):
            viewed = outcome.page_items[i][:int(outcome.n_viewed[i])]
            self.feedback[int(batch.session_id[i])] = (viewed.astype(np.int64),
                                                       np.asarray(outcome.clicked_items[i], np.int64))
            if self._tokens[i] is not None:
                self.tokens[int(batch.session_id[i])] = self._tokens[i]
            if not self.record:
                continue
            s, secs = self._pending[i]
            self.rows.append((s, secs, float(outcome.expected_clicks[i]), int(batch.session_id[i]),
                              bool(batch.is_repeat[i])))
            self.strategy_of[int(batch.request_id[i])] = s
            # the context the always-full path would have seen on this very state
            self.contexts.append(batch.context(i))
            self.interests.append(batch.interest[i])
            self.pages.append(np.asarray(outcome.page_items[i], np.int64))
