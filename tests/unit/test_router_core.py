"""recycle_router's logic without Triton or Redis: the in-process backend (the same ONNX
runtimes the Triton models run) and an in-memory cache with the RedisStageCache surface.
Serving, decisions and the cache state; failures and concurrency in test_router_faults.py."""
from __future__ import annotations

import asyncio
from dataclasses import replace

import numpy as np
import pytest

from comrecycle.router.entry import encode_entry
from comrecycle.router.memory_cache import MemoryStageCache as MemoryCache
from comrecycle.router.core import BackendError, RecycleRouter, RouterResult, ServingError
from comrecycle.router.state import apply_feedback, next_entry
from comrecycle.router.params import RouterParams
from comrecycle.runtime.validation import InputError
from comrecycle.specs import UNAVAILABLE_SCORE
from router_testkit import VERSION, make_router, request, serve


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
