"""The logic of `recycle_router` (docs/method.md), testable without Triton.

Per dynamically formed batch of client requests (one page each):

  validate -> claim the users' cache entries (one pipelined Redis round trip, with a per-user
  lock) -> request filter (router.request_filter: initial / repeated) -> decision step
  (router.decision: one estimator call for all repeated requests, strategy scores
  -(c_j + λ ΔQ_ij)) -> requests grouped by strategy, one call per group to the cascade suffix
  (groups issued concurrently) -> pages -> write back the recomputed stage outputs (one
  pipelined round trip) and release the locks.

The same core serves on Triton (Redis cache), in-process (memory cache) and in the simulator,
whose policies replace the decision step (sim.recycling).

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
import time
import uuid
from typing import Callable

import numpy as np

from ..runtime.validation import InputError
from ..specs import N_RECYCLE, PAGE_SIZE, ROUTER, STRATEGIES, UNAVAILABLE_SCORE
from .batch import (CACHE_TTL_S, N_STRATEGIES, PHASES, SESSION_TTL_S, Backend, BackendError,
                    BatchReport, RouterRequest, RouterResult, ServingError, call_strategy, lap, page_row)
from .decision import Decision, LearnedDecision
from .entry import CacheEntry
from .params import RouterParams
from .request_filter import parse_request, request_filter
from .state import next_entry, recent_unique
from .undelivered import UndeliveredFeedback

__all__ = ["PHASES", "BackendError", "BatchReport", "RecycleRouter", "RouterResult", "ServingError"]

log = logging.getLogger("comrecycle.router")


class RecycleRouter:
    """One per router model instance. `serve(requests)` is a coroutine (async BLS)."""

    def __init__(self, cache, backend: Backend, params: RouterParams, model_version: str | Callable[[], str],
                 ttl_s: float = CACHE_TTL_S, clock: Callable[[], float] = time.time, seed: int = 0,
                 session_ttl_s: float = SESSION_TTL_S, request_time_window_s: float = 0.0,
                 lock_refresh_s: float | None = None, decision: Decision | None = None):
        """ttl_s: lifetime of a cached stage list; session_ttl_s: of the user's session state
        (exposed items, page count); the Redis key lives as long. request_time_window_s > 0: a
        request_time further than this from the server clock is INVALID_ARG (0: not checked, for
        clients on a simulated clock). lock_refresh_s: how often a running batch extends its users'
        locks (default: a third of the cache's lock_ms). decision: the decision step (default:
        router.decision.LearnedDecision, the estimator and the params' rule)."""
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
        self.decision = decision if decision is not None else LearnedDecision(params, seed)
        # viewed items reported while Redis was unavailable: parked in Redis once it answers again
        self.feedback = UndeliveredFeedback(cache)
        self.costs = np.asarray(params.costs, np.float64)

    @property
    def undelivered(self) -> dict[int, np.ndarray]:
        """user id -> viewed items kept through a Redis outage (not yet parked)."""
        return self.feedback.kept

    def close(self) -> None:
        for part in (self.cache, self.backend):
            close = getattr(part, "close", None)
            if close is not None:
                close()

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
        reqs: list[RouterRequest] = []
        for i, tensors in enumerate(requests):
            try:
                r, viewed, clicked, new_session = parse_request(tensors, now, self.request_time_window_s)
            except InputError as e:
                report.invalid += 1
                answer(i, e)
                continue
            r.index, r.viewed, r.clicked, r.new_session = i, viewed, clicked, new_session
            r.exposed = recent_unique(viewed)  # what strategy 0 excludes unless the cache knows more
            reqs.append(r)
        t = lap(phase, "parse", t)
        if not reqs:
            return results, report
        initial_scores = np.r_[-self.costs[0], np.full(N_RECYCLE, UNAVAILABLE_SCORE)].astype(np.float32)
        pages: dict[int, np.ndarray] = {}

        claimed = [False]  # new sessions answered before the claim would not know their page_token
        deferred: list[RouterRequest] = []

        def done(group: list[RouterRequest]) -> None:
            for r in group:
                if answered[r.index]:
                    continue
                if r.new_session and not claimed[0] and r.outputs is not None:
                    deferred.append(r)
                    continue
                try:
                    if r.outputs is None:  # could not be served at all
                        raise ServingError(r.error or f"{ROUTER}: the request could not be served")
                    page, page_scores = page_row(r.outputs["rerank_items"], r.outputs["rerank_scores"])
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
        held: list[RouterRequest] = []
        stamps: dict[int, bytes] = {}  # what each held user's entry was when claimed (commit's check)
        parked_lens: dict[int, int] = {}  # the parked feedback each claim applied (trimmed at commit)
        keeper = None
        try:
            for r in reqs:  # feedback this router kept through a Redis outage goes with the user's request
                kept = self.feedback.take(r.user_id)
                if kept is not None and not r.new_session:
                    r.undelivered = kept
                    r.exposed = recent_unique(kept, r.exposed)
            claims = self.cache.claim([r.user_id for r in reqs], token,
                                      viewed=[np.concatenate([r.undelivered, r.viewed]) for r in reqs],
                                      new_session=[r.new_session for r in reqs])
            self.feedback.after_claim(reqs, claims, report)
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
            t = lap(phase, "claim", t)
            await self.decision(rest, self.backend, report)
            t = lap(phase, "decide", t)
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
            t = lap(phase, "stages", t)
            self._write_back(held, pages, token, stamps, parked_lens, report)
            lap(phase, "commit", t)
        return results, report

    def _filter(self, r: RouterRequest, claim, report: BatchReport) -> None:
        request_filter(r, claim, report, model_version=self.model_version, ttl_s=self.ttl_s,
                       session_ttl_s=self.session_ttl_s, params=self.params)

    async def _keep_locks(self, user_ids: list[int], token: str) -> None:
        """Extend the batch's locks every lock_refresh_s while it runs (cancelled at the write-back)."""
        while True:
            await asyncio.sleep(self.lock_refresh_s)
            self.cache.extend(user_ids, token)

    def _write_back(self, held: list[RouterRequest], pages: dict[int, np.ndarray], token: str, stamps: dict[int, bytes],
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
                    kept = r.outputs if r.cache_outputs is None else r.cache_outputs
                    writes[r.user_id] = next_entry(before, r.strategy if before is not None else 0, kept,
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

    # ---- 4. the cascade suffixes ----------------------------------------------------------------
    async def _call(self, group: list[RouterRequest], j: int) -> None:
        """Serve `group` by strategy j; raises BackendError. Requests whose outputs the decision
        step already computed are not run again."""
        todo = [r for r in group if r.outputs is None]
        for r, out in zip(todo, await call_strategy(self.backend, todo, j)):
            r.outputs = out

    async def _run_groups(self, reqs: list[RouterRequest], report: BatchReport,
                          done: Callable[[list[RouterRequest]], None] = lambda g: None) -> None:
        """One concurrent BLS call per strategy group; `done(group)` as soon as a group is served
        (so a recycled request never waits for a full cascade of the same batch); a failed
        recycling group is re-served by strategy 0."""
        groups = {j: [r for r in reqs if r.strategy == j] for j in STRATEGIES}
        groups = {j: g for j, g in groups.items() if g}

        async def run(j: int, g: list[RouterRequest]) -> None:
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
