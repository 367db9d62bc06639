"""The logic of `recycle_router` (docs/method.md), testable without Triton.

Per dynamically formed batch of client requests (one page each):

  validate -> claim the users' cache entries (one pipelined Redis round trip, with a per-user
  lock) -> request filter (initial / repeated) -> one estimator call for all repeated requests
  -> strategy scores -(c_j + λ ΔQ_ij) -> requests grouped by strategy, one call per group to
  the cascade suffix (groups issued concurrently) -> pages -> write back the recomputed stage
  outputs (one pipelined round trip) and release the locks.

The calls go through a `Backend` (Triton BLS in comrecycle/serving/backends/comrecycle_router/model.py; the
in-process onnxruntime cascade in tests and replays), the cache through a `RedisStageCache`
(or any object with its claim/commit/release surface).

Safe fallbacks (never another user's data, never a crash, every request answered once):
  * Redis down or slow: strategy 0, excluding the viewed items the request reports; nothing
    written for it; the router keeps those viewed items (bounded) and parks them in Redis once
    it answers again;
  * busy user (a concurrent request of the same user holds the lock): strategy 0, excluding what
    is known to be exposed (the entry read without the lock, the feedback parked by other busy
    requests and the request's own viewed items); its viewed items are parked in Redis and applied
    by the next request under the lock, so no feedback is lost;
  * corrupt entry / expired session: initial request; entry of other models (stale version): the
    session's exposed items and page count carry over, the lists do not;
  * estimator call failed (or answered the wrong shape): strategy 0 for the batch's repeated requests;
  * a recycling group's call failed: that group re-served by strategy 0 (counted);
  * strategy 0 itself failed: a per-request INTERNAL error naming the model and its message;
  * anything else that raises: the unanswered requests get strategy 0 where it can still run, an
    INTERNAL error otherwise; the batch's locks are released (or its entries written) in a finally.
The write-back happens only while the batch still holds each user's lock (extended while the
batch runs); a request whose page is not served still writes back the feedback it brought.

`request_time` (optional, seconds): finite and within [0, TIME_MAX] (else INVALID_ARG); within
`request_time_window_s` of the server clock when that is set (> 0; else INVALID_ARG); never earlier
than the user's last request (clamped to it, counted), so ages are never negative.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from ..rule import allowed_strategies, decide, depth_guard, policy_dq
from ..runtime.validation import InputError, check_tensor
from ..runtime.stage import pad_lists
from ..settings import SERVING, RouterSettings
from ..specs import (EXCLUDE_MAX, N_RECYCLE, PAD_ID, PAGE_SIZE, ROUTER, ROUTER_INPUTS, STAGES, STRATEGIES,
                     STRATEGY_CANDIDATES, STRATEGY_MODEL, UNAVAILABLE_SCORE)
from .entry import CacheEntry
from .state import READS, _in_sorted, apply_feedback, next_entry, recent_unique
from .params import RouterParams
from ..errors import ServingFailure

log = logging.getLogger("comrecycle.router")

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


def _lap(phase: dict, name: str, t0: float) -> float:
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
class _Req:
    """One valid request while its batch is processed."""

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


def _row(items: np.ndarray, scores: np.ndarray | None = None):
    keep = items != PAD_ID
    return items[keep], (None if scores is None else scores[keep])


class RecycleRouter:
    """One per router model instance. `serve(requests)` is a coroutine (async BLS)."""

    def __init__(self, cache, backend: Backend, params: RouterParams, model_version: str | Callable[[], str],
                 ttl_s: float = CACHE_TTL_S, clock: Callable[[], float] = time.time, seed: int = 0,
                 session_ttl_s: float = SESSION_TTL_S, request_time_window_s: float = 0.0,
                 lock_refresh_s: float | None = None):
        """ttl_s: lifetime of a cached stage list; session_ttl_s: of the user's session state
        (exposed items, page count); the Redis key lives as long. request_time_window_s > 0: a
        request_time further than this from the server clock is INVALID_ARG (0: not checked, for
        clients on a simulated clock). lock_refresh_s: how often a running batch extends its users'
        locks (default: a third of the cache's lock_ms)."""
        self.cache, self.backend, self.params = cache, backend, params
        # the stage models' fingerprint, or a callable giving it (read at the start of every batch)
        self._version_source = model_version if callable(model_version) else None
        self.model_version = model_version() if callable(model_version) else model_version
        self.ttl_s, self.clock = float(ttl_s), clock
        self.request_time_window_s = float(request_time_window_s)
        lock_ms = getattr(cache, "lock_ms", None)
        self.lock_refresh_s = lock_refresh_s if lock_refresh_s is not None else (
            lock_ms / 3000.0 if lock_ms else None)
        self.session_ttl_s = max(float(session_ttl_s), self.ttl_s)
        self.rng = np.random.default_rng(seed)
        # viewed items reported while Redis was unavailable: parked in Redis once it answers again,
        # by the next batch that reaches it or by a background retry (whichever comes first)
        self.undelivered: dict[int, np.ndarray] = {}
        self._undelivered_lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self.undelivered_retry_s = float(getattr(cache, "retry_after_s", 1.0)) or 1.0
        self.costs = np.asarray(params.costs, np.float64)
        self.uses_estimator = params.lam > 0 or params.omega > 0

    def close(self) -> None:
        for part in (self.cache, self.backend):
            close = getattr(part, "close", None)
            if close is not None:
                close()

    # ---- 1. validation ------------------------------------------------------------------------
    def parse(self, tensors: dict[str, np.ndarray], now: float) -> tuple[_Req, np.ndarray, np.ndarray, bool]:
        """One request -> (_Req, viewed, clicked, new_session); InputError if invalid."""
        for spec in ROUTER_INPUTS:
            value = tensors.get(spec.name)
            if value is None and spec.optional:
                continue
            if check_tensor(ROUTER, spec, value) != 1:
                raise InputError(f"model '{ROUTER}', input '{spec.name}': {ROUTER} serves one page per "
                                 f"request: expected batch size 1, got {value.shape[0]}")
        t = tensors.get("request_time")
        ns = tensors.get("new_session")
        if ns is not None and int(ns[0, 0]) not in (0, 1):
            raise InputError(f"model '{ROUTER}', input 'new_session': expected 0 or 1, got {int(ns[0, 0])}")
        if t is not None:
            t = float(t[0, 0])
            if not 0.0 <= t <= TIME_MAX:  # also NaN; the spec already refuses ±inf
                raise InputError(f"model '{ROUTER}', input 'request_time': expected seconds in [0, {TIME_MAX:g}] "
                                 f"(Unix time or a replay's clock), got {t:g}")
            if self.request_time_window_s > 0 and abs(t - now) > self.request_time_window_s:
                raise InputError(f"model '{ROUTER}', input 'request_time': expected a time within "
                                 f"{self.request_time_window_s:g} s of the server clock ({now:.3f}), got {t:.3f}")
        hist = tensors["history"][0]
        req = _Req(user_id=int(tensors["user_id"][0, 0]), user_features=tensors["user_features"][0],
                   history=hist[hist != PAD_ID], now=t if t is not None else now)
        token = tensors.get("page_token")
        req.token_in = int(token[0, 0]) if token is not None else None
        viewed, clicked = tensors["viewed_items"][0], tensors["clicked_items"][0]
        return req, viewed[viewed != PAD_ID], clicked[clicked != PAD_ID], bool(ns is not None and ns[0, 0] == 1)

    # ---- the whole batch ----------------------------------------------------------------------
    async def serve(self, requests: list[dict[str, np.ndarray]],
                    respond: Callable[[int, object], None] | None = None) -> tuple[list, BatchReport]:
        """requests: one dict of input tensors (batch dim 1) per client request. Returns one
        RouterResult | InputError | ServingError per request, and the batch's report.

        respond(i, result), when given, is called exactly once per request as soon as its result
        is known (invalid ones after the checks, the others when their strategy group is served):
        the Triton model answers from there, so a recycled request does not wait for a full
        cascade of its batch, nor for the cache write-back and the metrics that follow."""
        report = BatchReport(requests=len(requests))
        results: list = [None] * len(requests)
        answered = [False] * len(requests)
        if self._version_source is not None:
            try:
                self.model_version = self._version_source()
            except Exception:  # noqa: BLE001 - keep the last fingerprint
                log.exception("could not read the stage models' fingerprint; keeping %s", self.model_version)

        def answer(i: int, result) -> None:
            if answered[i]:  # exactly once, whatever path reaches here twice
                log.error("request %d of the batch was answered already; second answer dropped", i)
                return
            answered[i] = True
            results[i] = result
            if respond is not None:
                try:
                    respond(i, result)
                except Exception:  # noqa: BLE001 - one undeliverable answer must not fail the batch
                    log.exception("could not send the response of request %d", i)

        now = self.clock()
        phase = report.phase_seconds
        t = time.perf_counter()
        reqs: list[_Req] = []
        for i, tensors in enumerate(requests):
            try:
                r, viewed, clicked, new_session = self.parse(tensors, now)
            except InputError as e:
                report.invalid += 1
                answer(i, e)
                continue
            r.index, r.viewed, r.clicked, r.new_session = i, viewed, clicked, new_session
            r.exposed = recent_unique(viewed)  # what strategy 0 excludes unless the cache knows more
            reqs.append(r)
        t = _lap(phase, "parse", t)
        if not reqs:
            return results, report
        initial_scores = np.r_[-self.costs[0], np.full(N_RECYCLE, UNAVAILABLE_SCORE)].astype(np.float32)
        pages: dict[int, np.ndarray] = {}

        claimed = [False]  # new sessions answered before the claim would not know their page_token
        deferred: list[_Req] = []

        def done(group: list[_Req]) -> None:
            for r in group:
                if answered[r.index]:
                    continue
                if r.new_session and not claimed[0] and r.outputs is not None:
                    deferred.append(r)
                    continue
                try:
                    if r.outputs is None:  # could not be served at all
                        raise ServingError(r.error or f"{ROUTER}: the request could not be served")
                    page, page_scores = _row(r.outputs["rerank_items"], r.outputs["rerank_scores"])
                    page, page_scores = page[:PAGE_SIZE], page_scores[:PAGE_SIZE]
                    token = ((r.entry.page + 1 if r.entry is not None and not r.new_session else 1)
                             if r.held else 0)
                    result = RouterResult(page, page_scores, r.strategy, r.scores, token)
                except Exception as e:  # noqa: BLE001 - a malformed answer fails this request only
                    report.failed += 1
                    if not isinstance(e, ServingError):
                        log.exception("request %d: could not build its answer", r.index)
                        e = ServingError(f"{ROUTER}: internal error building the answer: {e}")
                    answer(r.index, e)
                    continue
                pages[r.index] = page
                report.strategies[r.strategy] += 1
                spent = self.costs[r.strategy] + (self.params.estimator_cost if r.estimated else 0.0)
                report.compute_spent += spent
                report.compute_saved += self.costs[0] - spent
                answer(r.index, result)

        # New sessions get the full cascade whatever the cache holds (their exposed items are
        # forgotten): their call goes out at once, before the claim, since they read nothing. The
        # claim still takes their lock in the same round trip, so a fast follow-up request of the
        # user waits for (is busy during) the write of their fresh entry.
        fresh = [r for r in reqs if r.new_session]
        for r in fresh:
            r.scores = initial_scores
        fresh_call = asyncio.ensure_future(self._run_groups(fresh, report, done)) if fresh else None
        if fresh_call is not None:
            await asyncio.sleep(0)  # let the call go out before the blocking claim
        rest = [r for r in reqs if not r.new_session]
        token = uuid.uuid4().hex
        held: list[_Req] = []
        stamps: dict[int, bytes] = {}  # what each held user's entry was when claimed (commit's check)
        parked_lens: dict[int, int] = {}  # the parked feedback each claim applied (trimmed at commit)
        keeper = None
        try:
            for r in reqs:  # feedback this router kept through a Redis outage goes with the user's request
                with self._undelivered_lock:
                    kept = self.undelivered.pop(r.user_id, None) if self.undelivered else None
                if kept is not None and not r.new_session:
                    r.undelivered = kept
                    r.exposed = recent_unique(kept, r.exposed)
            claims = self.cache.claim([r.user_id for r in reqs], token,
                                      viewed=[np.concatenate([r.undelivered, r.viewed]) for r in reqs],
                                      new_session=[r.new_session for r in reqs])
            self._keep_undelivered(reqs, claims, report)
            for r, claim in zip(reqs, claims):
                r.scores = initial_scores
                if claim.repaired:
                    report.repaired += 1
                try:
                    self._filter(r, claim, report)
                except Exception:  # noqa: BLE001 - a request filter bug fails no request
                    log.exception("user %d: request filter failed; serving the full cascade", r.user_id)
                    r.repeated, r.available = False, np.eye(1, N_STRATEGIES, dtype=bool)[0]
                    r.entry, r.write = None, False  # release the lock, write nothing, trim nothing
                    r.exposed = recent_unique(*([claim.entry.exposed] if claim.entry is not None else []),
                                              claim.pending, r.undelivered, r.viewed)
                if claim.held:
                    r.held = r.write
                    held.append(r)
                    stamps[r.user_id] = claim.stamp
                    parked_lens[r.user_id] = claim.parked_len
            claimed[0] = True
            if deferred:
                done(deferred)
            if held and self.lock_refresh_s:
                keeper = asyncio.ensure_future(self._keep_locks([r.user_id for r in held], token))
            t = _lap(phase, "claim", t)
            await self._decide(rest, report)
            t = _lap(phase, "decide", t)
            await self._run_groups(rest, report, done)
            if fresh_call is not None:
                await fresh_call
                fresh_call = None
        except Exception:  # noqa: BLE001 - the requests still unanswered get strategy 0 below
            log.exception("recycle_router: a batch of %d requests failed; answering what is left", len(reqs))
        finally:
            if fresh_call is not None:  # the new sessions' answers are out before this batch returns
                try:
                    await fresh_call
                except Exception:  # noqa: BLE001
                    log.exception("the new sessions' call failed")
            claimed[0] = True
            if deferred:
                done(deferred)
            left = [r for r in reqs if not answered[r.index]]
            if left:  # strategy 0 where it can still run, an INTERNAL error otherwise
                for r in left:
                    r.strategy, r.outputs, r.scores = 0, None, initial_scores
                try:
                    await self._call(left, 0)
                except Exception as e:  # noqa: BLE001
                    for r in left:
                        r.outputs, r.error = None, f"{ROUTER}: the full cascade failed: {e}"
                done(left)
            if keeper is not None:
                keeper.cancel()
            t = _lap(phase, "stages", t)
            self._write_back(held, pages, token, stamps, parked_lens, report)
            _lap(phase, "commit", t)
        return results, report

    def _keep_undelivered(self, reqs: list[_Req], claims, report: BatchReport) -> None:
        """Redis failed for the batch: keep the viewed items its requests reported (bounded); Redis
        answered: park what earlier batches kept, so that no feedback is lost to an outage."""
        if any(c.status == "error" for c in claims):
            with self._undelivered_lock:
                for r, c in zip(reqs, claims):
                    ids = np.concatenate([r.undelivered, r.viewed])
                    if c.status != "error" or not ids.size or r.new_session:
                        continue
                    if len(self.undelivered) >= UNDELIVERED_USERS_MAX and r.user_id not in self.undelivered:
                        self.undelivered.pop(next(iter(self.undelivered)))  # the oldest goes first
                        report.feedback_dropped += 1
                    old = self.undelivered.get(r.user_id, np.zeros(0, np.int64))
                    self.undelivered[r.user_id] = np.concatenate([old, ids])[-EXCLUDE_MAX:]
                start = self.undelivered and (self._flusher is None or not self._flusher.is_alive())
                if start:
                    self._flusher = threading.Thread(target=self._flush_loop, name="comrecycle-feedback",
                                                     daemon=True)
                    self._flusher.start()
        elif self.undelivered:
            self.flush_undelivered()

    def flush_undelivered(self) -> bool:
        """Park the kept feedback in Redis; True when nothing is left to deliver."""
        with self._undelivered_lock:
            kept, self.undelivered = self.undelivered, {}
        if not kept:
            return True
        if self.cache.park(kept):
            log.info("Redis answers again: parked the feedback of %d users kept during the outage", len(kept))
            return True
        with self._undelivered_lock:  # put back, under what arrived meanwhile
            for u, ids in kept.items():
                self.undelivered[u] = np.concatenate([ids, self.undelivered.get(u, np.zeros(0, np.int64))])[-EXCLUDE_MAX:]
        return False

    def _flush_loop(self) -> None:
        while True:
            time.sleep(self.undelivered_retry_s)
            if self.flush_undelivered():
                return

    async def _keep_locks(self, user_ids: list[int], token: str) -> None:
        """Extend the batch's locks every lock_refresh_s while it runs (cancelled at the write-back)."""
        while True:
            await asyncio.sleep(self.lock_refresh_s)
            self.cache.extend(user_ids, token)

    def _write_back(self, held: list[_Req], pages: dict[int, np.ndarray], token: str, stamps: dict[int, bytes],
                    parked_lens: dict[int, int], report: BatchReport) -> None:
        """One round trip: the entries of the users whose lock the batch holds (served: the next
        entry; not served: the feedback it brought, so none is lost), then the locks released."""
        writes: dict[int, CacheEntry | None] = {}
        release: list[int] = []
        try:
            for r in held:
                if r.user_id in writes or not r.write:
                    continue
                if r.index in pages:
                    before = None if r.new_session else r.entry
                    writes[r.user_id] = next_entry(before, r.strategy if before is not None else 0, r.outputs,
                                                   pages[r.index], r.now, self.model_version)
                elif r.entry is not None:
                    writes[r.user_id] = r.entry  # feedback applied, no page served
            release = [r.user_id for r in held if r.user_id not in writes]
            if not writes and not release:
                return
            applied = {u: n for u, n in parked_lens.items() if u in writes}  # released users keep theirs
            result = self.cache.commit(writes, token, release=release, stamps=stamps, parked_lens=applied)
        except Exception:  # noqa: BLE001 - a cache bug must not fail answered requests
            log.exception("cache write-back failed; releasing the batch's locks")
            report.cache_write_failed = True
            try:
                self.cache.release([r.user_id for r in held], token)
            except Exception:  # noqa: BLE001
                log.exception("could not release the batch's locks (they expire after lock_ms)")
            return
        report.cache_write_failed = not result
        report.lost_writes += getattr(result, "lost", 0)

    # ---- 2. request filter ----------------------------------------------------------------------
    def _filter(self, r: _Req, claim, report: BatchReport) -> None:
        """The request's view of the user's state after its claim (new sessions: none)."""
        if r.new_session:  # served by the fresh call; its entry is written if the claim holds the lock
            report.cache[claim.status if claim.status in ("busy", "error") else "new_session"] += 1
            return
        status = claim.status
        e = claim.entry
        if status == "busy":
            # strategy 0, excluding everything known to be exposed (read without the lock); its
            # viewed items were parked by the claim for the next request under the lock
            if r.viewed.size:
                report.parked_feedback += 1
            known = ([e.exposed] if e is not None else []) + [claim.pending, r.undelivered, r.exposed]
            r.exposed = recent_unique(*known)
        elif status == "hit" and e is not None:
            if not 0.0 <= e.last_ts <= TIME_MAX:  # written by a build without the request_time rules
                status, e = "corrupt", None
            elif r.now - e.last_ts > self.session_ttl_s:
                status, e = "expired", None
            elif e.model_version != self.model_version:
                # lists of other models are not recycled; the session (exposed items, pages) goes on
                status = "stale_version"
                e = CacheEntry(self.model_version, e.last_ts, e.page, e.exposed, e.last_page, {})
        report.cache[status] += 1
        if status in ("busy", "error"):
            return
        if e is None:  # miss, corrupt, expired: initial; the viewed items it reports (+ parked) are kept
            exposed = recent_unique(claim.pending, r.undelivered, r.viewed)
            r.entry = CacheEntry(self.model_version, r.now, 0, exposed, np.zeros(0, np.int64), {})
            r.exposed = exposed
            return
        if r.now < e.last_ts:  # a client clock that went back: ages are never negative
            report.time_clamped += 1
            r.now = e.last_ts
        # `last_page` holds the items of the pages served since the last one whose feedback arrived.
        # Feedback about the latest page (or without a token) settles them; about an older page (a
        # burst of requests), they stay held back from recycled pages until it does.
        settled = r.token_in is None or r.token_in == e.page
        if not settled:
            report.feedback_mismatch += 1
        r.entry, r.request_features, r.cache_state, r.available = apply_feedback(
            e, r.viewed, r.clicked, r.now, self.ttl_s, parked=np.concatenate([claim.pending, r.undelivered]),
            hold=None if settled else e.last_page)
        if settled:
            r.entry.last_page = np.zeros(0, np.int64)
            r.recyclable = {s: lst.items for s, lst in r.entry.lists.items()}
        else:
            held_back = np.sort(r.entry.last_page)
            r.recyclable = {s: lst.items[~_in_sorted(lst.items, held_back)] for s, lst in r.entry.lists.items()}
        if self.params.max_pages:
            r.available = depth_guard(r.available[None], r.cache_state[None], self.params.max_pages)[0]
        if self.params.strategies is not None:  # the family λ was certified for
            r.available = allowed_strategies(r.available[None], self.params.strategies)[0]
        r.exposed = r.entry.exposed
        r.repeated = True

    # ---- 3. estimator + decision ----------------------------------------------------------------
    async def _decide(self, reqs: list[_Req], report: BatchReport) -> None:
        # only requests that can recycle need a prediction
        rep = [r for r in reqs if r.repeated and r.available[1:].any()]
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
        chunks = [rep[k:k + SERVING.estimator_max_batch] for k in range(0, len(rep), SERVING.estimator_max_batch)]
        try:
            outs = await asyncio.gather(*[self.backend.infer(
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

    # ---- 4. the cascade suffixes ----------------------------------------------------------------
    def _inputs(self, group: list[_Req], j: int) -> dict[str, np.ndarray]:
        inputs = {"user_id": np.array([[r.user_id] for r in group], np.int64),
                  "user_features": np.stack([r.user_features for r in group]).astype(np.int64),
                  "history": pad_lists([r.history for r in group]),
                  "request_features": np.stack([r.request_features for r in group]).astype(np.float32)}
        if j == 0:
            inputs["exclude_items"] = pad_lists([r.exposed for r in group])
        else:
            inputs[STRATEGY_CANDIDATES[j]] = pad_lists([r.recyclable[READS[j]] for r in group])
        return inputs

    async def _call(self, group: list[_Req], j: int) -> None:
        """Serve `group` by strategy j (chunks of CALL_MAX_BATCH); raises BackendError."""
        for k in range(0, len(group), CALL_MAX_BATCH):
            chunk = group[k:k + CALL_MAX_BATCH]
            out = await self.backend.infer(STRATEGY_MODEL[j], self._inputs(chunk, j), STRATEGY_OUTPUTS[j])
            for row, r in enumerate(chunk):
                r.outputs = {name: out[name][row] for name in STRATEGY_OUTPUTS[j]}

    async def _run_groups(self, reqs: list[_Req], report: BatchReport,
                          done: Callable[[list[_Req]], None] = lambda g: None) -> None:
        """One concurrent BLS call per strategy group; `done(group)` as soon as a group is served
        (so a recycled request never waits for a full cascade of the same batch); a failed
        recycling group is re-served by strategy 0."""
        groups = {j: [r for r in reqs if r.strategy == j] for j in STRATEGIES}
        groups = {j: g for j, g in groups.items() if g}

        async def run(j: int, g: list[_Req]) -> None:
            await self._call(g, j)
            done(g)

        if len(groups) == 1:  # no gather: the call goes out in the caller's step (see serve)
            (j, g), = groups.items()
            try:
                results = [await run(j, g)]
            except Exception as e:  # noqa: BLE001 - handled below like gather's exceptions
                results = [e]
        else:
            results = await asyncio.gather(*[run(j, g) for j, g in groups.items()], return_exceptions=True)
        retry = []
        for (j, g), res in zip(groups.items(), results):
            if not isinstance(res, BaseException):
                continue
            if not isinstance(res, BackendError):
                log.exception("strategy %d call raised", j, exc_info=res)
            wasted = self.costs[j] * len(g)  # the failed call's work is spent all the same
            report.compute_spent += wasted
            report.compute_saved -= wasted
            if j == 0:
                for r in g:
                    r.outputs = None
                    r.error = f"{ROUTER}: the full cascade failed: {res}"
                done(g)
            else:
                log.warning("strategy %d call failed for %d requests; re-serving them by strategy 0: %s",
                            j, len(g), res)
                report.fallbacks += len(g)
                for r in g:
                    r.strategy, r.outputs = 0, None
                retry += g
        if retry:
            try:
                await self._call(retry, 0)
            except Exception as e:  # noqa: BLE001 - turned into per-request errors
                for r in retry:
                    r.outputs = None
                    r.error = f"{ROUTER}: the full cascade failed: {e}"
            done(retry)
