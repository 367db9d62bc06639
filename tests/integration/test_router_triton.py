"""recycle_router on a real tritonserver with a real redis-server: the request filter, parity of
every strategy with the in-process router, the same pages as the simulator and the in-process
router for the same sessions, viewed items, TTL and version changes, Redis killed
mid-run, concurrent same-user requests, bad inputs, metrics, and a version switch under load."""
from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from comrecycle.sim.router_loop import RouterInTheLoop, router_sender
from client.triton_client import CascadeClient, ServingError
from comrecycle.repository import install_router_params, repository_server
from comrecycle.router.cache import RedisStageCache
from comrecycle.router.memory_cache import MemoryStageCache
from comrecycle.router.core import RecycleRouter
from comrecycle.router.inprocess import InProcessBackend
from comrecycle.router.params import RouterParams
from comrecycle.router.serving import model_set_fingerprint
from comrecycle.serving.redis_server import RedisServer
from comrecycle.specs import ROUTER, UNAVAILABLE_SCORE

pytestmark = pytest.mark.integration
COSTS = [1.0, 0.9, 0.8, 0.05]


def forcing(j: int) -> list[float]:
    """Costs under which λ ≈ 0 picks strategy j for every repeat that can use it."""
    c = [1.0, 1.0, 1.0, 1.0]
    c[j] = 0.01
    return c


def write_params(path: Path, costs, lam=1e-3) -> Path:
    """λ = 1e-3: the estimator is called (λ = 0 skips it) but never outweighs the cost gaps."""
    path.write_text(json.dumps({"lambda": lam, "costs": list(costs), "omega": 0.0, "estimator_cost": 0.02,
                                "budget": 0.01}))
    return path


@pytest.fixture(scope="module")
def stack(tiny_repository, tmp_path_factory):
    """A private copy of the tiny repository with a router version, a redis-server, tritonserver."""
    tmp = tmp_path_factory.mktemp("router")
    repo = tmp / "repo"
    shutil.copytree(tiny_repository, repo)
    install_router_params(repo, write_params(tmp / "p1.json", COSTS), version=1)
    with RedisServer() as redis_srv:
        env = {"COMRECYCLE_REDIS_URL": redis_srv.url, "COMRECYCLE_REDIS_RETRY_S": "0.2",
               "COMRECYCLE_REDIS_TIMEOUT_MS": "100",
               # the background thread sends the metrics; short, so metric() need not wait long
               "COMRECYCLE_ROUTER_METRICS_FLUSH_S": str(METRICS_FLUSH_S),
               # overlapping batches (router/runner.py): every test here then also checks that
               # path; the default one-batch-at-a-time path runs in the BLS re-rank test below
               "COMRECYCLE_ROUTER_MAX_INFLIGHT_BATCHES": "4"}
        with repository_server(repo, startup_timeout=180, env=env) as srv:
            yield {"repo": repo, "redis": redis_srv, "triton": srv, "tmp": tmp,
                   "cache": RedisStageCache(redis_srv.url, retry_after_s=0.05)}


def req(user, history=(), viewed=(), clicked=(), t=0.0, **extra):
    r = {"user_id": np.array([user], np.int64), "user_features": np.array([0, 1, 2], np.int64),
         "history": np.asarray(history, np.int64), "viewed_items": np.asarray(viewed, np.int64),
         "clicked_items": np.asarray(clicked, np.int64), "request_time": np.array([t], np.float64)}
    r.update(extra)
    return r


async def _send(url, reqs, concurrent=False):
    async with CascadeClient(url, "grpc") as c:
        async def one(r):
            try:
                return await c.infer(ROUTER, r)
            except ServingError as e:
                return e
        if concurrent:
            return await asyncio.gather(*[one(r) for r in reqs])
        return [await one(r) for r in reqs]


def send(stack, reqs, concurrent=False):
    return asyncio.run(_send(stack["triton"].grpc_url, reqs, concurrent))


METRICS_FLUSH_S = 0.1


def metric(stack, name: str, **labels) -> float:
    """The sum of the series of `name` with `labels`, after the router's next metrics flush."""
    time.sleep(3 * METRICS_FLUSH_S)
    text = urllib.request.urlopen(stack["triton"].metrics_endpoint, timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def load_version(stack, costs, tag: str) -> int:
    import tritonclient.http as http

    v = install_router_params(stack["repo"], write_params(stack["tmp"] / f"{tag}.json", costs))
    http.InferenceServerClient(stack["triton"].http_url).load_model(ROUTER)
    return int(v.name)


def in_process_router(tiny_model_set, tiny_estimator, costs, repo):
    return RecycleRouter(MemoryStageCache(), InProcessBackend.load(tiny_model_set, tiny_estimator),
                         RouterParams(lam=1e-3, costs=tuple(costs), estimator_cost=0.02), model_set_fingerprint(repo))


def session(stack, user, pages, t0=0.0, gap=7.0, n_view=6, reference=None):
    """Pages of one user's session with the client in the loop (views the first n_view items,
    clicks the first). Checks each page against `reference` (an in-process router) if given."""
    out, viewed, clicked, history = [], [], [], [3, 5]
    for p in range(pages):
        r = req(user, history=history, viewed=viewed, clicked=clicked, t=t0 + p * gap)
        (res,) = send(stack, [r])
        assert not isinstance(res, Exception), res
        if reference is not None:
            (ref,), _ = asyncio.run(reference.serve([{k: v[None] for k, v in r.items()}]))
            assert int(res["strategy"][0]) == ref.strategy
            np.testing.assert_array_equal(res["page_items"], ref.page_items)
            np.testing.assert_allclose(res["page_scores"], ref.page_scores, rtol=1e-5, atol=1e-6)
        out.append(res)
        viewed, clicked = list(res["page_items"][:n_view]), list(res["page_items"][:1])
        history = [int(res["page_items"][0])] + history
    return out


def test_initial_then_repeated_and_viewed_items_never_come_back(stack):
    pages = session(stack, 101, 6)
    assert [int(p["strategy"][0]) for p in pages] == [0, 3, 3, 3, 3, 3]
    seen = set()
    for p in pages:
        assert not seen & set(p["page_items"].tolist()), "a viewed item was served again"
        assert p["page_items"].size == 20
        reported = set(seen)  # the last page's views are reported with the next request
        seen |= set(p["page_items"][:6].tolist())
    assert (pages[0]["strategy_scores"][1:] == UNAVAILABLE_SCORE).all()
    np.testing.assert_allclose(pages[1]["strategy_scores"], [-c for c in COSTS], atol=2e-3)
    e = stack["cache"].claim([101], "peek")[0].entry
    stack["cache"].release([101], "peek")
    # the rank list was computed for page 1 and served all 6 pages
    assert e.page == 6 and e.lists["rank"].pages == 6 and set(e.exposed.tolist()) == reported


@pytest.mark.parametrize("j", [0, 1, 2, 3])
def test_each_strategy_matches_the_in_process_router(stack, tiny_model_set, tiny_estimator, j):
    load_version(stack, forcing(j), f"force{j}")
    try:
        ref = in_process_router(tiny_model_set, tiny_estimator, forcing(j), stack["repo"])
        pages = session(stack, 200 + j, 4, reference=ref)
        assert [int(p["strategy"][0]) for p in pages] == [0, j, j, j]
    finally:
        load_version(stack, COSTS, f"back{j}")


def test_ttl_expiry_and_model_version_change_make_the_request_initial(stack):
    session(stack, 301, 2, t0=0.0)
    expired0 = metric(stack, "comrecycle_cache_lookups_total", result="expired")
    (res,) = send(stack, [req(301, t=1000.0)])  # lists > 900 s old: not recycled; the session lives on
    assert int(res["strategy"][0]) == 0 and (res["strategy_scores"][1:] == UNAVAILABLE_SCORE).all()
    assert metric(stack, "comrecycle_cache_lookups_total", result="expired") == expired0
    (res,) = send(stack, [req(301, t=5000.0)])  # silent > 3900 s: a new session
    assert int(res["strategy"][0]) == 0
    assert metric(stack, "comrecycle_cache_lookups_total", result="expired") == expired0 + 1
    # an entry written by other stage models is treated as absent
    cache = stack["cache"]
    e = cache.claim([301], "t")[0].entry
    e.model_version = "another-model-set"
    assert cache.commit({301: e}, "t")
    (res,) = send(stack, [req(301, t=5005.0)])
    assert int(res["strategy"][0]) == 0
    (res,) = send(stack, [req(301, t=5010.0)])
    assert int(res["strategy"][0]) == 3


def test_corrupt_entry_is_absent_and_counted(stack):
    session(stack, 302, 1)
    raw = stack["cache"]._client.get(stack["cache"].entry_key(302))
    stack["cache"]._client.set(stack["cache"].entry_key(302), raw[:-5] + b"xxxxx")
    before = metric(stack, "comrecycle_cache_lookups_total", result="corrupt")
    (res,) = send(stack, [req(302, t=10.0)])
    assert int(res["strategy"][0]) == 0
    assert metric(stack, "comrecycle_cache_lookups_total", result="corrupt") == before + 1


def test_redis_killed_mid_run_serves_strategy_zero_then_recovers(stack):
    session(stack, 303, 2)
    stack["redis"].kill()
    try:
        errors0 = metric(stack, "comrecycle_cache_lookups_total", result="error")
        res = send(stack, [req(303, t=20.0 + k) for k in range(3)])
        assert all(not isinstance(r, Exception) and int(r["strategy"][0]) == 0 and r["page_items"].size == 20
                   for r in res)
        assert metric(stack, "comrecycle_cache_lookups_total", result="error") >= errors0 + 1
    finally:
        stack["redis"].restart()
    import time
    time.sleep(0.5)  # > retry_after_s: the circuit lets the next batch try Redis again
    pages = session(stack, 303, 3, t0=100.0)  # the data died with Redis: initial, then repeats
    assert [int(p["strategy"][0]) for p in pages] == [0, 3, 3]


def test_concurrent_requests_of_one_user(stack):
    session(stack, 304, 1)
    busy0 = metric(stack, "comrecycle_cache_lookups_total", result="busy")
    res = send(stack, [req(304, t=10.0) for _ in range(8)], concurrent=True)
    assert all(not isinstance(r, Exception) for r in res)
    busy = metric(stack, "comrecycle_cache_lookups_total", result="busy") - busy0
    e = stack["cache"].claim([304], "peek")[0].entry
    stack["cache"].release([304], "peek")
    # only the requests that held the user's lock read the cache and wrote it back
    assert e.page == 1 + (8 - busy)
    assert busy >= 1
    assert sum(int(r["strategy"][0]) == 0 for r in res) >= busy


def test_no_user_ever_gets_another_users_items(stack):
    a = session(stack, 305, 3, n_view=0)
    b = session(stack, 306, 1)
    e_a = stack["cache"].claim([305], "peek")[0].entry
    stack["cache"].release([305], "peek")
    # user 306's first page came from the full cascade, not 305's cache (different users
    # may share popular items, so the check is on the cache, not on the pages)
    assert int(b[0]["strategy"][0]) == 0
    np.testing.assert_array_equal(e_a.last_page[:len(a[-1]["page_items"])], a[-1]["page_items"])  # newest first


def test_bad_inputs_get_invalid_arg_with_what_was_expected(stack):
    good = req(401)
    bad = [dict(good, viewed_items=np.array([-4], np.int64)),
           dict(good, request_time=np.array([np.inf])),
           dict(good, new_session=np.array([3], np.int64)),
           dict(good, user_features=np.array([0, 1], np.int64)),
           dict(good, history=np.arange(60, dtype=np.int64))]
    res = send(stack, bad + [good])
    msgs = [str(r) for r in res[:5]]
    assert all(isinstance(r, ServingError) for r in res[:5]), res
    assert "input 'viewed_items': ids and codes must be >= 0, got -4" in msgs[0]
    assert "input 'request_time': expected finite values, got inf" in msgs[1]
    assert "input 'new_session': expected 0 or 1, got 3" in msgs[2]
    assert "user_features" in msgs[3] and "3" in msgs[3]
    assert "input 'history': expected at most 50 item ids, got 60" in msgs[4]
    assert not isinstance(res[5], Exception)


def test_metrics_are_exported_and_move(stack):
    before = {j: metric(stack, "comrecycle_router_requests_total", strategy=j) for j in range(4)}
    spent0 = metric(stack, "comrecycle_compute_units_total", kind="spent")
    full0 = metric(stack, "comrecycle_compute_units_total", kind="always_full")
    session(stack, 402, 3)
    after = {j: metric(stack, "comrecycle_router_requests_total", strategy=j) for j in range(4)}
    assert after[0] == before[0] + 1 and after[3] == before[3] + 2
    spent = metric(stack, "comrecycle_compute_units_total", kind="spent") - spent0
    full = metric(stack, "comrecycle_compute_units_total", kind="always_full") - full0
    assert spent == pytest.approx(1.0 + 2 * (0.05 + 0.02), rel=1e-5) and full == pytest.approx(3.0)
    assert metric(stack, "comrecycle_router_latency_seconds_count", strategy=3) >= 2
    assert metric(stack, "comrecycle_cache_lookups_total", result="hit") >= 2
    for phase in ("parse", "claim", "decide", "stages", "commit"):
        assert metric(stack, "comrecycle_router_phase_seconds_count", phase=phase) >= 3
    assert metric(stack, "comrecycle_router_phase_seconds_sum", phase="stages") > 0


def test_version_switch_under_load_fails_no_request(stack):
    async def load(stop: asyncio.Event):
        results = []
        async with CascadeClient(stack["triton"].grpc_url, "grpc") as c:
            async def user_loop(u):
                k = 0
                while not stop.is_set():
                    try:
                        results.append(await c.infer(ROUTER, req(u, t=float(k))))
                    except ServingError as e:
                        results.append(e)
                    k += 1
            await asyncio.gather(*[user_loop(u) for u in range(500, 504)])
        return results

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(load(stop))
        await asyncio.sleep(1.0)
        v = await asyncio.to_thread(load_version, stack, [1.0, 0.9, 0.8, 0.04], "rollout")
        await asyncio.sleep(1.0)
        stop.set()
        return v, await task

    version, results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(results) > 20 and not errors, errors[:3]
    import tritonclient.http as http
    assert http.InferenceServerClient(stack["triton"].http_url).is_model_ready(ROUTER, str(version))


def test_strategy_three_over_bls_matches_the_local_rerank(tiny_repository, tiny_model_set, tiny_estimator,
                                                          tmp_path):
    """COMRECYCLE_ROUTER_LOCAL_STAGES=none: re-ranking goes through the Triton `rerank` model;
    the pages are the same as the in-process (local) re-ranking."""
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo)
    install_router_params(repo, write_params(tmp_path / "p.json", forcing(3)), version=1)
    with RedisServer() as redis_srv:
        env = {"COMRECYCLE_REDIS_URL": redis_srv.url, "COMRECYCLE_ROUTER_LOCAL_STAGES": "none"}
        with repository_server(repo, startup_timeout=180, env=env) as srv:
            import tritonclient.http as http

            before = http.InferenceServerClient(srv.http_url).get_inference_statistics("rerank")
            st = {"triton": srv}
            ref = in_process_router(tiny_model_set, tiny_estimator, forcing(3), repo)
            pages = session(st, 300, 3, reference=ref)
            assert [int(p["strategy"][0]) for p in pages] == [0, 3, 3]
            after = http.InferenceServerClient(srv.http_url).get_inference_statistics("rerank")
    count = lambda s: int(s["model_stats"][0]["inference_stats"]["success"]["count"])  # noqa: E731
    assert count(after) - count(before) == 3  # 1 inside the full cascade + 2 BLS calls for strategy 3


def _triton_answer(stack, r):
    from client.triton_client import Timed

    return Timed(None, 0.0, str(r)) if isinstance(r, Exception) else Timed(r, 0.0)


def test_simulator_in_process_and_triton_serve_the_same_pages(stack, tiny_model_set, tiny_estimator, tiny_world,
                                                              tiny_cascade):
    """One core, three paths: the same simulated sessions served by the simulator's recycling
    server, by the in-process router (memory cache) and by recycle_router on Triton (Redis), all
    recycling the rank list whenever the cache state allows, get the same pages."""
    from comrecycle.sim.env import SessionSimulator
    from comrecycle.sim.recycling import RecyclingServer, fixed_assignment

    costs = [1.0, 1.0, 1.0, 0.05]  # with λ = 0: strategy 3 whenever the rank list is usable, else 0
    import tritonclient.http as http

    install_router_params(stack["repo"], write_params(stack["tmp"] / "three_paths.json", costs, lam=0.0))
    http.InferenceServerClient(stack["triton"].http_url).load_model(ROUTER)
    try:
        local = RecycleRouter(MemoryStageCache(), InProcessBackend.load(tiny_model_set, tiny_estimator),
                              RouterParams(lam=0.0, costs=tuple(costs)), model_set_fingerprint(stack["repo"]))

        n, seed = 200, 5
        runs = {}
        paths = (("triton", RouterInTheLoop(lambda reqs: [_triton_answer(stack, r) for r in
                                                          send(stack, reqs, concurrent=True)])),
                 ("in-process", RouterInTheLoop(router_sender(local))),
                 ("simulator", RecyclingServer(tiny_world, tiny_cascade, fixed_assignment(3))))
        for name, serve in paths:
            table = SessionSimulator(tiny_world, seed=seed, concurrency=16).run(n, serve, progress=False).table()
            strategy = (table["strategy"].to_numpy() if name == "simulator" else
                        np.array([serve.strategy_of[int(r)] for r in table["request_id"].to_numpy()]))
            assert name == "simulator" or not serve.errors, serve.errors[:3]
            runs[name] = (strategy, table["page_items"].to_pylist())
        ref_strategy, ref_pages = runs["simulator"]
        assert (ref_strategy == 3).mean() > 0.3
        for name in ("in-process", "triton"):
            np.testing.assert_array_equal(runs[name][0], ref_strategy, err_msg=name)
            assert runs[name][1] == ref_pages, name
    finally:
        load_version(stack, COSTS, "after_three_paths")
