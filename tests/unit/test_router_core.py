"""recycle_router's logic without Triton or Redis: the in-process backend (the same ONNX
runtimes the Triton models run) and an in-memory cache with the RedisStageCache surface."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from comrecycle.router.entry import encode_entry
from comrecycle.router.memory_cache import MemoryStageCache as MemoryCache
from comrecycle.router.core import BackendError, RecycleRouter, RouterResult, ServingError
from comrecycle.router.state import apply_feedback, next_entry
from comrecycle.router.inprocess import InProcessBackend
from comrecycle.router.params import RouterParams
from comrecycle.runtime.validation import InputError
from comrecycle.specs import UNAVAILABLE_SCORE

VERSION = "test-models"


def request(user, history=(), viewed=(), clicked=(), t=None, features=(0, 1, 2), new_session=None, token=None):
    r = {"user_id": np.array([[user]], np.int64), "user_features": np.array([features], np.int64),
         "history": np.array([list(history)], np.int64).reshape(1, -1),
         "viewed_items": np.array([list(viewed)], np.int64).reshape(1, -1),
         "clicked_items": np.array([list(clicked)], np.int64).reshape(1, -1)}
    if t is not None:
        r["request_time"] = np.array([[t]], np.float64)
    if new_session is not None:
        r["new_session"] = np.array([[new_session]], np.int64)
    if token is not None:
        r["page_token"] = np.array([[token]], np.int64)
    return r


@pytest.fixture(scope="module")
def backend(tiny_model_set, tiny_estimator):
    return InProcessBackend.load(tiny_model_set, tiny_estimator)


def make_router(backend, costs=(1.0, 0.9, 0.8, 0.05), lam=1e-3, cache=None, ttl_s=900.0):
    """λ = 1e-3: ΔQ̂ (|ΔQ̂| < 1) never outweighs the cost gaps, but the estimator is called."""
    params = RouterParams(lam=lam, costs=tuple(costs), estimator_cost=0.02)
    return RecycleRouter(cache or MemoryCache(), backend, params, VERSION, ttl_s=ttl_s, clock=lambda: 1000.0)


def serve(router, reqs):
    return asyncio.run(router.serve(reqs))


def test_initial_then_repeated_request_recycles_the_cached_rank_list(backend):
    router = make_router(backend)  # λ ≈ 0: the cheapest available strategy (3) for repeats
    (first,), rep = serve(router, [request(7, history=[3, 4], t=100.0)])
    assert isinstance(first, RouterResult) and first.strategy == 0 and first.page_items.size == 20
    assert rep.cache["miss"] == 1 and rep.strategies.tolist() == [1, 0, 0, 0]
    e = router.cache.entry(7)
    assert set(e.lists) == {"retrieval", "prerank", "rank"} and all(l.pages == 1 for l in e.lists.values())
    np.testing.assert_array_equal(e.last_page, first.page_items)

    viewed = first.page_items[:5]
    (second,), rep = serve(router, [request(7, history=[3, 4], viewed=viewed, clicked=viewed[:1], t=110.0)])
    assert second.strategy == 3 and rep.cache["hit"] == 1
    assert not np.isin(second.page_items, viewed).any()  # viewed items never come back from the cache
    # the page equals re-ranking the cached rank list minus the viewed items, in-process
    rank_left = e.lists["rank"].items[~np.isin(e.lists["rank"].items, viewed)]
    ref = asyncio.run(backend.infer("rerank", {
        "user_id": np.array([[7]], np.int64), "user_features": np.array([[0, 1, 2]], np.int64),
        "history": np.array([[3, 4]], np.int64),
        "request_features": np.array([[10.0, 1, 5, 1]], np.float32), "candidates": rank_left[None]},
        ["rerank_items", "rerank_scores"]))
    np.testing.assert_array_equal(second.page_items, ref["rerank_items"][0][:20])
    np.testing.assert_allclose(second.page_scores, ref["rerank_scores"][0][:20], rtol=1e-6)
    e2 = router.cache.entry(7)
    assert e2.lists["rank"].pages == 2 and e2.page == 2
    np.testing.assert_array_equal(e2.exposed, np.sort(viewed))
    # strategy scores: -(c_j + λ ΔQ) ≈ -c_j with λ = 1e-3; all available
    np.testing.assert_allclose(second.strategy_scores, [-1.0, -0.9, -0.8, -0.05], atol=2e-3)


@pytest.mark.parametrize("j", [0, 1, 2, 3])
def test_each_strategy_serves_the_in_process_page_from_the_same_cache(backend, j):
    costs = [1.0, 1.0, 1.0, 1.0]
    costs[j] = 0.01  # λ ≈ 0: argmin c_j = j
    router = make_router(backend, costs=costs)
    (first,), _ = serve(router, [request(11, history=[5], t=0.0)])
    before = router.cache.entry(11)
    viewed = first.page_items[[0, 2, 4]]
    (res,), _ = serve(router, [request(11, history=[5, int(viewed[0])], viewed=viewed, t=30.0)])
    assert res.strategy == j
    context = {"user_id": np.array([[11]], np.int64), "user_features": np.array([[0, 1, 2]], np.int64),
               "history": np.array([[5, int(viewed[0])]], np.int64),
               "request_features": np.array([[30.0, 1, 3, 0]], np.float32)}
    model, feed = {0: ("cascade", "exclude_items"), 1: ("cascade_from_prerank", "retrieval_items"),
                   2: ("cascade_from_rank", "prerank_items"), 3: ("rerank", "candidates")}[j]
    if j == 0:
        context[feed] = np.sort(viewed)[None]
    else:
        items = before.lists[("retrieval", "prerank", "rank")[j - 1]].items
        context[feed] = items[~np.isin(items, viewed)][None]
    ref = asyncio.run(backend.infer(model, context, ["rerank_items"]))["rerank_items"][0]
    np.testing.assert_array_equal(res.page_items, ref[ref != -1][:20])
    after = router.cache.entry(11)
    # the stages it computed were written back (1 page); the others served one more page
    for k, s in enumerate(("retrieval", "prerank", "rank")):
        assert after.lists[s].pages == (1 if k >= j else before.lists[s].pages + 1)


def test_cache_state_counts_pages_since_each_list_was_computed():
    """apply_feedback/next_entry (the router's and, through sim.recycling.StageCache, the
    simulator's cache): pages served, ages and items left per list; the list origin."""
    rng = np.random.default_rng(0)
    entry, t, computed_at, rank_page = None, 0.0, {}, None
    for step, j in enumerate([0, 3, 3, 1, 2, 3, 0, 3]):
        rank_page = step if j <= 2 else rank_page  # the session page the rank list was computed for
        computed = {f"{s}_items": rng.permutation(500)[:n] for s, n in (("retrieval", 100), ("prerank", 60), ("rank", 30))
                    if ("retrieval", "prerank", "rank").index(s) >= j}
        for k in computed:
            computed_at[k.split("_")[0]] = (step, t)
        page = rng.permutation(500)[:20]
        entry = next_entry(entry, j, computed, page, t, VERSION)
        viewed = page[:rng.integers(0, 10)]
        t += float(rng.integers(1, 200))
        entry, feats, state, avail = apply_feedback(entry, viewed, viewed[:1], t, 900.0)
        assert feats[1] == step + 1 and feats[2] == np.unique(viewed).size
        for k, stage in enumerate(("retrieval", "prerank", "rank")):
            at_step, at_t = computed_at[stage]
            lst = entry.lists[stage]
            assert not np.isin(lst.items, viewed).any()
            if t - at_t <= 900.0:
                np.testing.assert_allclose(state[3 * k:3 * k + 3], [t - at_t, step + 1 - at_step, lst.items.size])
                assert avail[k + 1]
        # the estimator's list origin (model.py): request page - pages served
        assert feats[1] - state[7] == rank_page


def test_bad_inputs_get_per_request_errors_and_do_not_fail_the_batch(backend):
    router = make_router(backend)
    bad_dtype = request(1)
    bad_dtype["user_features"] = bad_dtype["user_features"].astype(np.int32)
    two_rows = request(2)
    two_rows = {k: np.repeat(v, 2, axis=0) for k, v in two_rows.items()}
    nan_time = request(3, t=float("nan"))
    neg_view = request(4, viewed=[-5])
    missing = request(5)
    del missing["history"]
    results, rep = serve(router, [bad_dtype, two_rows, nan_time, neg_view, missing, request(6)])
    msgs = [str(r) for r in results[:5]]
    assert all(isinstance(r, InputError) for r in results[:5])
    assert "input 'user_features': expected dtype INT64, got int32" in msgs[0]
    assert "expected batch size 1, got 2" in msgs[1]
    assert "input 'request_time': expected finite values, got nan" in msgs[2]
    assert "input 'viewed_items': ids and codes must be >= 0, got -5" in msgs[3]
    assert "input 'history': missing" in msgs[4]
    assert isinstance(results[5], RouterResult) and rep.invalid == 5


def test_same_user_twice_in_a_batch_never_shares_cached_items(backend):
    router = make_router(backend)
    (first,), _ = serve(router, [request(9, t=0.0)])
    results, rep = serve(router, [request(9, t=5.0), request(9, t=5.0)])
    assert sorted(r.strategy for r in results) == [0, 3]  # the second is "busy": full cascade
    assert rep.cache["busy"] == 1
    assert router.cache.locks == {}  # locks released
    assert router.cache.entry(9).page == 2  # only the request that held the lock wrote back


def test_redis_down_serves_strategy_zero_and_writes_nothing(backend):
    router = make_router(backend)
    serve(router, [request(12, t=0.0)])
    router.cache.down = True
    (res,), rep = serve(router, [request(12, t=5.0)])
    assert res.strategy == 0 and rep.cache["error"] == 1 and res.page_items.size == 20
    router.cache.down = False
    (res,), rep = serve(router, [request(12, t=6.0)])  # recovers: the old entry is still there
    assert res.strategy == 3 and rep.cache["hit"] == 1


def test_expired_new_session_other_version_and_corrupt_entries_are_initial(backend):
    router = make_router(backend, ttl_s=60.0)  # lists expire after 60 s, the session after 3900 s
    serve(router, [request(20, t=0.0), request(21, t=0.0), request(22, t=0.0), request(23, t=0.0)])
    e = router.cache.entry(22)
    router.cache.data[22] = encode_entry(replace(e, model_version="other"))
    router.cache.data[23] = router.cache.data[23][:-3]  # truncated
    results, rep = serve(router, [request(20, t=3901.0), request(21, t=10.0, new_session=1),
                                  request(22, t=10.0), request(23, t=10.0)])
    assert [r.strategy for r in results] == [0, 0, 0, 0]
    assert rep.cache["expired"] == 1 and rep.cache["new_session"] == 1
    assert rep.cache["stale_version"] == 1 and rep.cache["corrupt"] == 1
    assert router.cache.entry(21).page == 1 and router.cache.entry(21).exposed.size == 0
    assert router.cache.entry(22).model_version == VERSION  # rewritten under our version


class FailingBackend:
    def __init__(self, inner, fail: set[str]):
        self.inner, self.fail = inner, fail

    async def infer(self, model, inputs, outputs, version=-1):
        if model in self.fail:
            raise BackendError(f"{model}: injected failure")
        return await self.inner.infer(model, inputs, outputs, version)


def test_estimator_or_suffix_failure_falls_back_to_the_full_cascade(backend):
    for fail, field in (({"estimator"}, "estimator_failures"), ({"rerank"}, "fallbacks")):
        router = make_router(FailingBackend(backend, fail))
        serve(router, [request(30, t=0.0)])
        (res,), rep = serve(router, [request(30, t=5.0)])
        assert res.strategy == 0 and getattr(rep, field) == 1 and res.page_items.size == 20
    router = make_router(FailingBackend(backend, {"cascade"}))
    (res,), rep = serve(router, [request(31, t=0.0)])
    assert isinstance(res, ServingError) and "cascade: injected failure" in str(res)
    assert rep.failed == 1 and router.cache.locks == {}


def test_one_estimator_call_and_one_call_per_strategy_group(backend):
    router = make_router(backend)
    users = list(range(40, 52))
    serve(router, [request(u, t=0.0) for u in users])
    backend.calls.clear()
    results, rep = serve(router, [request(u, t=3.0) for u in users] + [request(99, t=3.0)])
    models = [m for m, _ in backend.calls]
    assert models.count("estimator") == 1 and dict(backend.calls)["estimator"] == 12
    assert models.count("rerank") == 1 and models.count("cascade") == 1  # 12 recycled + 1 initial
    assert rep.strategies.tolist() == [1, 0, 0, 12]
    assert rep.compute_spent == pytest.approx(1.0 + 12 * (0.05 + 0.02))


def test_router_in_the_simulator_serves_what_the_simulators_recycling_server_serves(
        backend, tiny_model_set, tiny_world, tiny_cascade):
    """The router (client in the loop: feedback, simulated time, new sessions) and the
    simulator's RecyclingServer, both recycling the rank list whenever they can, serve the
    same pages to the same simulated sessions: same request filter, cache and features."""
    from comrecycle.sim.router_loop import RouterInTheLoop, router_sender
    from comrecycle.sim.env import SessionSimulator
    from comrecycle.sim.recycling import RecyclingServer, fixed_assignment

    # λ = 0 and c = (1, 1, 1, 0.05): strategy 3 whenever the rank list is usable, else 0 (ties
    # go to the lower id), as fixed_assignment(3)
    router = make_router(backend, costs=(1.0, 1.0, 1.0, 0.05), lam=0.0)
    serve = RouterInTheLoop(router_sender(router))

    n = 240
    via_router = SessionSimulator(tiny_world, seed=3, concurrency=16).run(n, serve, progress=False).table()
    sim_server = RecyclingServer(tiny_world, tiny_cascade, fixed_assignment(3))
    reference = SessionSimulator(tiny_world, seed=3, concurrency=16).run(n, sim_server, progress=False).table()
    strategies = np.array([serve.strategy_of[int(r)] for r in via_router["request_id"].to_numpy()])
    np.testing.assert_array_equal(strategies, reference["strategy"].to_numpy())
    assert (strategies == 3).mean() > 0.3
    np.testing.assert_allclose(via_router["expected_reward"].to_numpy(), reference["expected_reward"].to_numpy(),
                               rtol=1e-6)


def test_expired_lists_are_not_recycled_but_the_session_goes_on(backend):
    router = make_router(backend, ttl_s=60.0)
    (first,), _ = serve(router, [request(25, t=0.0)])
    viewed = first.page_items[:4]
    (res,), rep = serve(router, [request(25, viewed=viewed, t=100.0)])  # lists 100 s old > 60 s
    assert res.strategy == 0 and rep.cache["hit"] == 1 and rep.cache["expired"] == 0
    assert (res.strategy_scores[1:] == UNAVAILABLE_SCORE).all()
    assert not np.isin(res.page_items, viewed).any()  # the session's exposed items are still excluded
    assert router.cache.entry(25).page == 2


def test_depth_guard_stops_recycling_a_list_after_max_pages(backend):
    params = RouterParams(lam=0.0, costs=(1.0, 1.0, 1.0, 0.05), max_pages=3)
    router = RecycleRouter(MemoryCache(), backend, params, VERSION)
    strategies = []
    for k in range(6):
        (res,), _ = serve(router, [request(60, t=10.0 * k)])
        strategies.append(res.strategy)
    # the rank list computed on page 0 serves pages 1 and 2, then it has served 3 pages: refresh
    assert strategies == [0, 3, 3, 0, 3, 3]


def test_with_lambda_zero_the_estimator_is_not_called_nor_paid_for(backend):
    router = make_router(backend, lam=0.0)
    serve(router, [request(70, t=0.0)])
    backend.calls.clear()
    (res,), rep = serve(router, [request(70, t=5.0)])
    assert res.strategy == 3 and "estimator" not in [m for m, _ in backend.calls]
    assert rep.compute_spent == pytest.approx(0.05)  # c_3, no estimator cost
    np.testing.assert_allclose(res.strategy_scores, [-1.0, -0.9, -0.8, -0.05], rtol=1e-6)


def test_short_list_membership_matches_numpy():
    from comrecycle.router.state import isin

    rng = np.random.default_rng(1)
    items = rng.integers(0, 50, 300)
    for n in (0, 1, 7, 64, 65, 200):
        small = rng.integers(0, 50, n)
        np.testing.assert_array_equal(isin(items, small), np.isin(items, small))


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
