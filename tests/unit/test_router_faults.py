"""recycle_router's fallbacks without Triton or Redis: failing calls, answers that cannot be
sent, busy users, Redis outages, clocks that go back, feedback about older pages: every request is
answered once, no lock is left held and no feedback is lost."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from comrecycle.router.entry import encode_entry
from comrecycle.router.memory_cache import MemoryStageCache as MemoryCache
from comrecycle.router.core import RecycleRouter, RouterResult
from comrecycle.router.params import RouterParams
from comrecycle.runtime.validation import InputError
from router_testkit import VERSION, make_router, request, serve


class SlowCascade:
    """The full cascade takes 0.3 s; recycling suffixes answer at once."""

    def __init__(self, inner):
        self.inner = inner

    async def infer(self, model, inputs, outputs, version=-1):
        if model == "cascade":
            await asyncio.sleep(0.3)
        return await self.inner.infer(model, inputs, outputs, version)


def test_each_request_is_answered_once_as_soon_as_its_group_is_served(backend):
    import time

    router = make_router(SlowCascade(backend))
    serve(router, [request(u, t=0.0) for u in (60, 61)])
    answers = []
    t0 = time.perf_counter()
    bad = request(62, t=3.0)
    bad["user_features"] = np.array([[0, 1]], np.int64)
    reqs = [request(60, t=3.0), request(63, t=3.0), bad, request(61, t=3.0)]
    results, rep = asyncio.run(router.serve(reqs, lambda i, r: answers.append((i, r, time.perf_counter() - t0))))
    assert sorted(i for i, *_ in answers) == [0, 1, 2, 3]  # every request, exactly once
    assert [r for _, r, _ in sorted(answers, key=lambda a: a[0])] == results
    when = {i: dt for i, _, dt in answers}
    assert answers[0][0] == 2 and isinstance(answers[0][1], InputError)  # the bad input: right after the checks
    # the two recycled requests are answered before the initial one's slow cascade is done
    assert results[0].strategy == 3 and results[3].strategy == 3 and results[1].strategy == 0
    assert max(when[0], when[3]) < 0.25 <= when[1]
    # ... and the write-back still happens for all three after the answers
    assert router.cache.entry(63) is not None and router.cache.entry(60).page == 2 and router.cache.locks == {}


def test_an_answer_that_cannot_be_sent_does_not_fail_the_batch(backend):
    router = make_router(backend)

    def respond(i, r):
        if i == 0:
            raise RuntimeError("client went away")

    results, rep = asyncio.run(router.serve([request(70, t=0.0), request(71, t=0.0)], respond))
    assert all(isinstance(r, RouterResult) for r in results) and rep.strategies[0] == 2
    assert router.cache.entry(70) is not None and router.cache.entry(71) is not None


class RecordingCache(MemoryCache):
    """Records, at each claim, the calls the backend had already received."""

    def __init__(self, backend_calls: list, fail: bool = False):
        super().__init__()
        self.backend_calls, self.fail, self.calls_at_claim, self.claimed = backend_calls, fail, [], []

    def claim(self, user_ids, token, **kwargs):
        self.calls_at_claim.append(list(self.backend_calls))
        self.claimed.append(list(user_ids))
        if self.fail:
            raise RuntimeError("claim blew up")
        return super().claim(user_ids, token, **kwargs)


class CallLog:
    def __init__(self, inner):
        self.inner, self.calls = inner, []

    async def infer(self, model, inputs, outputs, version=-1):
        self.calls.append((model, inputs["user_id"][:, 0].tolist() if "user_id" in inputs else None))
        await asyncio.sleep(0)  # an async BLS call: out at once, answered later
        return await self.inner.infer(model, inputs, outputs, version)


def test_new_sessions_never_wait_for_redis_and_store_their_entry_after_the_answers(backend):
    log = CallLog(backend)
    cache = RecordingCache(log.calls)
    router = make_router(log, cache=cache)
    serve(router, [request(80, t=0.0), request(81, t=0.0)])
    log.calls.clear()
    cache.calls_at_claim.clear()
    cache.claimed.clear()
    # 80 repeats (cache hit -> strategy 3), 82 starts a new session, 81 starts one over its entry
    results, rep = serve(router, [request(80, t=5.0), request(82, t=5.0, new_session=1),
                                  request(81, t=5.0, new_session=1)])
    assert cache.calls_at_claim == [[("cascade", [82, 81])]]  # their call was out before the claim
    assert cache.claimed == [[80, 82, 81]]  # one round trip: the new sessions take their locks too
    assert [r.strategy for r in results] == [3, 0, 0] and rep.cache["new_session"] == 2
    # their fresh entries were stored after the answers: one page deep, nothing exposed
    assert cache.entry(82).page == 1 and cache.entry(81).page == 1 and cache.locks == {}
    assert cache.entry(81).exposed.size == 0
    np.testing.assert_array_equal(cache.entry(81).last_page, results[2].page_items)


def test_a_new_session_does_not_overwrite_the_entry_of_a_request_in_flight(backend):
    router = make_router(backend)
    serve(router, [request(85, t=0.0)])
    before = router.cache.data[85]
    router.cache.locks[85] = "another batch"  # a request of user 85 is being served elsewhere
    (res,), rep = serve(router, [request(85, t=5.0, new_session=1)])
    assert res.strategy == 0 and rep.cache["busy"] == 1 and not rep.cache_write_failed
    assert router.cache.data[85] == before and router.cache.locks == {85: "another batch"}
    del router.cache.locks[85]
    serve(router, [request(85, t=6.0, new_session=1)])
    assert router.cache.data[85] != before and router.cache.entry(85).page == 1


def test_a_failing_claim_still_answers_the_new_sessions_once(backend):
    log = CallLog(backend)
    router = make_router(log, cache=RecordingCache(log.calls, fail=True))
    answers = []
    asyncio.run(router.serve([request(90, t=0.0, new_session=1), request(91, t=0.0)],
                             lambda i, r: answers.append((i, r))))
    # the new session's call was out: it is answered once; the other request, whose claim blew up,
    # still gets strategy 0 (never an error for a bug in the cache layer)
    assert sorted(i for i, _ in answers) == [0, 1]
    assert all(isinstance(r, RouterResult) and r.strategy == 0 for _, r in answers)


class _FixedEstimator:
    """The backend, with the estimator answering a fixed ΔQ̂ for strategies 1..3."""

    def __init__(self, backend, dq):
        self.backend, self.dq = backend, np.asarray(dq, np.float32)

    async def infer(self, model, inputs, outputs, version=-1):
        if model == "estimator":
            return {"delta_q": np.tile(self.dq, (len(inputs["history"]), 1))}
        return await self.backend.infer(model, inputs, outputs, version)


@pytest.mark.parametrize("credit_gains,strategy", [(True, 1), (False, 3)])
def test_without_credit_for_gains_a_predicted_gain_does_not_lower_a_score(backend, credit_gains, strategy):
    # c = (1, .9, .8, .05), λ = 1, ΔQ̂ = (-0.2, 0.5, 0.8): net, strategy 1 scores -0.7 and wins;
    # with max(ΔQ̂, 0) it scores -0.9 and strategy 3 (-0.85) wins
    params = RouterParams(lam=1.0, costs=(1.0, 0.9, 0.8, 0.05), credit_gains=credit_gains)
    router = RecycleRouter(MemoryCache(), _FixedEstimator(backend, [-0.2, 0.5, 0.8]), params, VERSION,
                           clock=lambda: 1000.0)
    serve(router, [request(80, t=0.0)])
    (res,), _ = serve(router, [request(80, t=5.0)])
    gain = -0.2 if credit_gains else 0.0
    np.testing.assert_allclose(res.strategy_scores, [-1.0, -(0.9 + gain), -1.3, -0.85], rtol=1e-6)
    assert res.strategy == strategy



# ---- consistency rules (the same rules run against Redis and Triton in tests/integration) ---------
@pytest.mark.parametrize("t", [1e308, -1e308, -5.0, float("nan"), 2e10])
def test_a_request_time_out_of_range_is_invalid_and_poisons_nothing(backend, t):
    router = make_router(backend)
    serve(router, [request(60, t=0.0)])
    (bad,), rep = serve(router, [request(60, t=t)])
    assert isinstance(bad, InputError) and "request_time" in str(bad) and rep.invalid == 1
    results, rep = serve(router, [request(60, t=5.0), request(60, t=6.0), request(60, t=7.0)])
    ok = [r for r in results if isinstance(r, RouterResult)]
    assert len(ok) == 3 and rep.failed == 0  # the user's later requests are served


def test_a_request_time_before_the_last_one_is_clamped_so_ages_stay_positive(backend):
    router = make_router(backend)
    serve(router, [request(61, t=100.0)])
    (res,), rep = serve(router, [request(61, t=50.0)])
    assert isinstance(res, RouterResult) and rep.time_clamped == 1
    assert router.cache.entry(61).last_ts == 100.0


def test_the_request_time_window_follows_the_server_clock(backend):
    params = RouterParams(lam=1e-3, costs=(1.0, 0.9, 0.8, 0.05), estimator_cost=0.02)
    router = RecycleRouter(MemoryCache(), backend, params, VERSION, clock=lambda: 1_000_000.0,
                           request_time_window_s=60.0)
    (ok, late, early), rep = serve(router, [request(62, t=1_000_030.0), request(63, t=1_000_100.0),
                                            request(64, t=10.0)])
    assert isinstance(ok, RouterResult) and rep.invalid == 2
    assert "within 60 s of the server clock" in str(late) and isinstance(early, InputError)


class _WrongShapeEstimator:
    def __init__(self, inner):
        self.inner = inner

    async def infer(self, model, inputs, outputs, version=-1):
        if model == "estimator":
            return {"delta_q": np.zeros((len(inputs["history"]), 2), np.float32)}  # K = 3 expected
        return await self.inner.infer(model, inputs, outputs, version)


def test_an_estimator_answer_of_the_wrong_shape_serves_strategy_zero(backend):
    router = make_router(_WrongShapeEstimator(backend))
    serve(router, [request(65, t=0.0), request(66, t=0.0)])
    results, rep = serve(router, [request(65, t=5.0), request(66, t=5.0)])
    assert [r.strategy for r in results] == [0, 0] and rep.estimator_failures == 2 and rep.failed == 0
    assert rep.compute_spent == pytest.approx(2 * (1.0 + 0.02))  # the failed call is paid for
    assert router.cache.locks == {} and router.cache.entry(65).page == 2


class _ExplodingFilterRouter(RecycleRouter):
    def _decide(self, reqs, report):
        raise RuntimeError("a bug in the decision")


def test_anything_that_raises_still_answers_every_request_once_and_releases_the_locks(backend):
    params = RouterParams(lam=1e-3, costs=(1.0, 0.9, 0.8, 0.05), estimator_cost=0.02)
    router = _ExplodingFilterRouter(MemoryCache(), backend, params, VERSION, clock=lambda: 1000.0)
    answers = []
    results, rep = asyncio.run(router.serve([request(67, t=0.0), request(68, t=0.0, new_session=1)],
                                            lambda i, r: answers.append(i)))
    assert sorted(answers) == [0, 1] and all(isinstance(r, RouterResult) and r.strategy == 0 for r in results)
    assert router.cache.locks == {} and router.cache.entry(67).page == 1  # written back in the finally


def test_a_busy_request_parks_its_feedback_and_excludes_what_is_known_to_be_exposed(backend):
    router = make_router(backend)
    (first,), _ = serve(router, [request(69, t=0.0)])
    page = first.page_items
    router.cache.locks[69] = "another batch"  # a request of user 69 is in flight elsewhere
    (busy,), rep = serve(router, [request(69, viewed=page[:5], t=5.0)])
    assert busy.strategy == 0 and rep.cache["busy"] == 1 and rep.parked_feedback == 1 and busy.page_token == 0
    assert not set(page[:5].tolist()) & set(busy.page_items.tolist())
    np.testing.assert_array_equal(np.sort(router.cache.parked[69]), np.sort(page[:5]))
    del router.cache.locks[69]
    (nxt,), rep = serve(router, [request(69, t=6.0)])  # no feedback of its own: the parked one applies
    assert nxt.strategy == 3 and 69 not in router.cache.parked  # applied, written, trimmed
    assert set(page[:5].tolist()) <= set(router.cache.entry(69).exposed.tolist())
    assert not set(page[:5].tolist()) & set(nxt.page_items.tolist())


def test_a_write_back_after_the_lock_was_taken_over_is_skipped_and_counted(backend):
    class StealingCache(MemoryCache):
        steal = False

        def commit(self, writes, token, release=(), **kwargs):
            for u in writes if self.steal else ():  # the lock expired; a newer request took it, changed the entry
                self.locks[u] = "newer request"
                self.data[u] = encode_entry(replace(self.entry(u), page=99))
            return super().commit(writes, token, release, **kwargs)

    cache = StealingCache()
    router = make_router(backend, cache=cache)
    serve(router, [request(70, t=0.0)])
    cache.steal = True
    (res,), rep = serve(router, [request(70, t=5.0)])
    assert isinstance(res, RouterResult) and rep.lost_writes == 1
    assert router.cache.entry(70).page == 99  # the newer request's state stands


def test_an_entry_of_other_models_keeps_the_session_s_exposed_items(backend):
    router = make_router(backend)
    (first,), _ = serve(router, [request(71, t=0.0)])
    serve(router, [request(71, viewed=first.page_items[:4], t=5.0)])
    e = router.cache.entry(71)
    router.cache.data[71] = encode_entry(replace(e, model_version="other models"))
    (res,), rep = serve(router, [request(71, t=9.0)])
    assert res.strategy == 0 and rep.cache["stale_version"] == 1 and rep.cache["hit"] == 0
    assert not set(first.page_items[:4].tolist()) & set(res.page_items.tolist())
    after = router.cache.entry(71)
    assert set(first.page_items[:4].tolist()) <= set(after.exposed.tolist()) and after.page == e.page + 1


def test_feedback_about_an_older_page_holds_the_newer_pages_back_from_recycling(backend):
    router = make_router(backend)
    (p1,), _ = serve(router, [request(72, t=0.0)])
    assert p1.page_token == 1
    # a burst: two requests both carry the feedback of page 1 (the client has seen nothing newer)
    (a,), _ = serve(router, [request(72, viewed=p1.page_items[:3], t=5.0, token=1)])
    (b,), rep = serve(router, [request(72, viewed=p1.page_items[:3], t=5.5, token=1)])
    assert a.strategy == 3 and b.strategy == 3 and a.page_token == 2 and b.page_token == 3
    assert rep.feedback_mismatch == 1
    assert not set(a.page_items.tolist()) & set(b.page_items.tolist())  # page 2 is not recycled again
    # the feedback of page 3 (the latest) settles the held pages: their unviewed items come back
    (c,), rep = serve(router, [request(72, viewed=b.page_items[:2], t=9.0, token=3)])
    assert rep.feedback_mismatch == 0 and c.strategy == 3
    assert set(a.page_items.tolist()) & set(c.page_items.tolist())


def test_lookups_add_up_to_the_valid_requests(backend):
    router = make_router(backend)
    serve(router, [request(73, t=0.0), request(74, t=0.0)])
    router.cache.locks[74] = "elsewhere"
    reqs = [request(73, t=5.0), request(74, t=5.0), request(75, t=5.0, new_session=1), request(73, t=5.0),
            request(76, t=1e308)]
    _, rep = serve(router, reqs)
    assert sum(rep.cache.values()) == rep.requests - rep.invalid == 4
    assert (rep.cache["hit"], rep.cache["busy"], rep.cache["new_session"]) == (1, 2, 1)


def test_feedback_reported_while_redis_is_down_reaches_the_cache_when_it_is_back(backend):
    router = make_router(backend)
    (first,), _ = serve(router, [request(77, t=0.0)])
    router.cache.down = True
    (during,), rep = serve(router, [request(77, viewed=first.page_items[:5], t=5.0)])
    assert during.strategy == 0 and rep.cache["error"] == 1 and during.page_token == 0
    assert not set(first.page_items[:5].tolist()) & set(during.page_items.tolist())
    router.cache.down = False
    serve(router, [request(78, t=6.0)])  # any batch that reaches Redis parks what was kept
    assert router.undelivered == {} and set(router.cache.parked[77].tolist()) == set(first.page_items[:5].tolist())
    (after,), _ = serve(router, [request(77, t=7.0)])  # the user's next request applies it
    assert set(first.page_items[:5].tolist()) <= set(router.cache.entry(77).exposed.tolist())
    assert not set(first.page_items[:5].tolist()) & set(after.page_items.tolist())


def test_recent_unique_keeps_the_latest_ids_in_order_and_caps_them():
    from comrecycle.router.state import recent_unique

    out = recent_unique(np.array([5, 1, 9]), np.array([1, 7]), limit=3)
    np.testing.assert_array_equal(out, [9, 1, 7])  # 5 is the oldest; 1 counts at its latest position
    assert recent_unique().size == 0


def test_a_long_outage_never_makes_the_exclusions_too_long(backend):
    router = make_router(backend)
    serve(router, [request(79, t=0.0), request(80, t=0.0)])
    router.cache.down = True
    router.undelivered[79] = np.arange(10_000, 12_000)  # 2 000 items kept through the outage
    results, rep = serve(router, [request(79, viewed=np.arange(20), t=5.0), request(80, t=5.0)])
    assert all(isinstance(r, RouterResult) for r in results) and rep.failed == 0


def test_a_new_session_answered_before_the_claim_still_gets_its_page_token(backend):
    router = make_router(backend)  # the in-process backend answers at once, before the claim
    (res,), _ = serve(router, [request(81, t=0.0, new_session=1)])
    assert res.page_token == 1 and router.cache.entry(81).page == 1


def test_a_request_filter_failure_releases_the_lock_and_keeps_the_session(backend):
    class BrokenFilter(RecycleRouter):
        def _filter(self, r, claim, report):
            raise RuntimeError("a bug in the filter")

    params = RouterParams(lam=1e-3, costs=(1.0, 0.9, 0.8, 0.05), estimator_cost=0.02)
    ok = RecycleRouter(MemoryCache(), backend, params, VERSION, clock=lambda: 1000.0)
    (first,), _ = serve(ok, [request(82, t=0.0)])
    serve(ok, [request(82, viewed=first.page_items[:4], t=5.0)])
    before = ok.cache.data[82]
    broken = BrokenFilter(ok.cache, backend, params, VERSION, clock=lambda: 1000.0)
    (res,), rep = serve(broken, [request(82, t=9.0)])
    assert isinstance(res, RouterResult) and res.strategy == 0 and res.page_token == 0
    assert not set(first.page_items[:4].tolist()) & set(res.page_items.tolist())  # exposed still excluded
    assert ok.cache.data[82] == before and ok.cache.locks == {}


def test_an_entry_that_cannot_be_encoded_releases_the_lock_and_keeps_the_parked_feedback():
    from comrecycle.router.entry import CacheEntry

    cache = MemoryCache()
    assert cache.claim([1], "t", viewed=[np.array([4, 5])])[0].status == "miss"
    bad = CacheEntry("v", float("nan"), 1, np.zeros(0, np.int64), np.zeros(0, np.int64), {})
    result = cache.commit({1: bad}, "t", parked_lens={1: 16})
    assert not result.ok and cache.locks == {} and 1 not in cache.data
    np.testing.assert_array_equal(cache.parked[1], [4, 5])
