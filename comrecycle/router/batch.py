"""What one batch of recycle_router works on: the requests as the router holds them while it
serves them (`RouterRequest`), their answers (`RouterResult`), the batch's report, the backend
surface and the router's constants. Shared by the router core (router.core), its request filter
(router.request_filter) and its decision step (router.decision)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from ..errors import ServingFailure
from ..settings import SERVING, RouterSettings
from ..runtime.stage import pad_lists
from ..specs import N_RECYCLE, PAD_ID, STAGES, STRATEGIES, STRATEGY_CANDIDATES, STRATEGY_MODEL
from .entry import CacheEntry
from .state import READS

N_STRATEGIES = len(STRATEGIES)
SESSION_TTL_S = RouterSettings().session_ttl_s  # a user silent this long starts a new session
CACHE_TTL_S = SERVING.cache_ttl_s
# the stage outputs a strategy's model returns that the cache stores, plus the page
STRATEGY_OUTPUTS = {j: [f"{s}_items" for s in STAGES[j:-1]] + ["rerank_items", "rerank_scores"]
                    for j in STRATEGIES}
CALL_MAX_BATCH = SERVING.ensemble_max_batch  # rows per BLS call of a cascade suffix (its config's max_batch_size)
TIME_MAX = 1e10  # request_time upper bound in seconds (year 2286): larger values overflow the features
UNDELIVERED_USERS_MAX = 100_000  # users whose feedback a router keeps while Redis is unavailable


class BackendError(ServingFailure):
    """A model call failed (the message names the model and Triton's error)."""


class ServingError(ServingFailure):
    """A request that could not be served (-> INTERNAL for that request only)."""


class Backend(Protocol):
    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: Sequence[str],
                    version: int = -1) -> dict[str, np.ndarray]:
        """One batched call; raises BackendError."""


@dataclass
class RouterResult:
    page_items: np.ndarray  # [n <= PAGE_SIZE] int64
    page_scores: np.ndarray  # [n] float32
    strategy: int
    strategy_scores: np.ndarray  # [K+1] float32, UNAVAILABLE_SCORE where unavailable
    page_token: int = 0  # the page's number in the session (0: not recorded in the cache)

    def tensors(self) -> dict[str, np.ndarray]:
        """Output tensors with the batch dim of 1 (names from specs.ROUTER_OUTPUTS)."""
        return {"page_items": self.page_items[None].astype(np.int64),
                "page_scores": self.page_scores[None].astype(np.float32),
                "strategy": np.array([[self.strategy]], np.int64),
                "strategy_scores": self.strategy_scores[None].astype(np.float32),
                "page_token": np.array([[self.page_token]], np.int64)}


PHASES = ("parse", "claim", "decide", "stages", "commit")
CACHE_RESULTS = ("hit", "miss", "busy", "corrupt", "error", "stale_version", "expired", "new_session")


def lap(phase: dict, name: str, t0: float) -> float:
    t = time.perf_counter()
    phase[name] += t - t0
    return t


@dataclass
class BatchReport:
    """What one batch did (model.py turns it into Prometheus metrics)."""

    requests: int = 0
    invalid: int = 0
    failed: int = 0
    strategies: np.ndarray = field(default_factory=lambda: np.zeros(N_STRATEGIES, np.int64))
    # one result per look-up (they add up to the requests that passed the checks)
    cache: dict = field(default_factory=lambda: dict.fromkeys(CACHE_RESULTS, 0))
    estimator_failures: int = 0
    fallbacks: int = 0  # recycling groups re-served by strategy 0
    compute_spent: float = 0.0  # in units of one full cascade
    compute_saved: float = 0.0  # versus strategy 0 for every served request
    cache_write_failed: bool = False
    lost_writes: int = 0  # write-backs skipped: the batch no longer held the user's lock
    repaired: int = 0  # keys that held no entry of ours (another Redis type, oversize), deleted
    time_clamped: int = 0  # request_time earlier than the user's last request, clamped to it
    parked_feedback: int = 0  # requests whose viewed items were parked for the next holder of the lock
    feedback_mismatch: int = 0  # feedback whose page_token is not the user's latest page
    feedback_dropped: int = 0  # users whose kept feedback was dropped (UNDELIVERED_USERS_MAX reached)
    # wall seconds of each phase of the batch: where a slow request spent its time
    phase_seconds: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))


@dataclass
class RouterRequest:
    """One valid request while its batch is processed.

    The decision step (router.decision) sets `strategy`, `scores` and `estimated`. A decision that
    has already run the chosen strategy for a request (the simulator's, which computes every
    strategy's page on the same state) may leave its outputs in `outputs`: the router serves them
    instead of calling the model again. `cache_outputs`, when set, are the stage outputs the
    write-back keeps instead of the served ones (the simulator's shadow exploration: the lists
    the policy's own choice would have left); None: the served outputs."""

    user_id: int
    user_features: np.ndarray  # [3]
    history: np.ndarray  # [n]
    now: float
    status: str = "miss"  # the claim: hit | miss | busy | corrupt | error
    repeated: bool = False
    writable: bool = False  # we hold the user's lock and may write the entry back
    entry: CacheEntry | None = None  # the entry after the new feedback was applied
    request_features: np.ndarray = field(default_factory=lambda: np.array([-1, 0, 0, 0], np.float32))
    cache_state: np.ndarray = field(default_factory=lambda: np.full(3 * N_RECYCLE, -1, np.float32))
    available: np.ndarray = field(default_factory=lambda: np.eye(1, N_STRATEGIES, dtype=bool)[0])
    exposed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    strategy: int = 0
    scores: np.ndarray | None = None  # [K+1] strategy scores
    outputs: dict | None = None
    error: str = ""  # why it could not be served (outputs None)
    estimated: bool = False  # the estimator was called for it (its cost counts)
    index: int = -1  # position in the batch
    new_session: bool = False
    held: bool = False  # the batch holds the user's lock: its page is recorded in the cache
    write: bool = True  # False: the lock is released without a write (the request filter failed)
    token_in: int | None = None  # the page_token the feedback refers to (None: the latest page)
    recyclable: dict = field(default_factory=dict)  # stage -> cached items a recycled page may use
    viewed: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    clicked: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    undelivered: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # kept through an outage
    cache_outputs: dict | None = None


def page_row(items: np.ndarray, scores: np.ndarray | None = None):
    keep = items != PAD_ID
    return items[keep], (None if scores is None else scores[keep])


def strategy_inputs(group: list[RouterRequest], j: int) -> dict[str, np.ndarray]:
    """The input tensors of strategy j's model (specs.STRATEGY_MODEL) for a group of requests:
    their context, and what strategy 0 excludes or the cached list strategy j reads."""
    inputs = {"user_id": np.array([[r.user_id] for r in group], np.int64),
              "user_features": np.stack([r.user_features for r in group]).astype(np.int64),
              "history": pad_lists([r.history for r in group]),
              "request_features": np.stack([r.request_features for r in group]).astype(np.float32)}
    if j == 0:
        inputs["exclude_items"] = pad_lists([r.exposed for r in group])
    else:
        inputs[STRATEGY_CANDIDATES[j]] = pad_lists([r.recyclable[READS[j]] for r in group])
    return inputs


async def call_strategy(backend: Backend, group: list[RouterRequest], j: int) -> list[dict[str, np.ndarray]]:
    """Strategy j's outputs (STRATEGY_OUTPUTS[j], batch dim dropped) for each request of `group`,
    in calls of at most CALL_MAX_BATCH rows; raises BackendError."""
    outputs: list[dict[str, np.ndarray]] = []
    for k in range(0, len(group), CALL_MAX_BATCH):
        chunk = group[k:k + CALL_MAX_BATCH]
        out = await backend.infer(STRATEGY_MODEL[j], strategy_inputs(chunk, j), STRATEGY_OUTPUTS[j])
        outputs += [{name: out[name][row] for name in STRATEGY_OUTPUTS[j]} for row in range(len(chunk))]
    return outputs
