"""recycle_router's consistency of a user's own state, on a real tritonserver and redis-server:
bad inputs that poison nothing, keys that are not ours repaired, metrics that add up, and the
concurrency suite of perf/router_consistency.py (bursts and session load, 30+ s) with zero
items shared by recycled answers in flight together, zero viewed items served again and zero
failed requests."""
from __future__ import annotations

import asyncio
import json
import shutil
import time
import urllib.request

import numpy as np
import pytest
import redis

from client.triton_client import CascadeClient, ServingError
from comrecycle.repository import install_router_params, repository_server
from comrecycle.router.cache import RedisStageCache
from comrecycle.serving.redis_server import RedisServer
from comrecycle.specs import ROUTER
from perf.router_consistency import FORCING_PARAMS, run_suite

pytestmark = pytest.mark.integration
FLUSH_S = 0.1


@pytest.fixture(scope="module")
def stack(tiny_repository, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("consistency")
    repo = tmp / "repo"
    shutil.copytree(tiny_repository, repo)
    (tmp / "p.json").write_text(json.dumps(FORCING_PARAMS))
    install_router_params(repo, tmp / "p.json", version=1)
    with RedisServer() as redis_srv:
        env = {"COMRECYCLE_REDIS_URL": redis_srv.url, "COMRECYCLE_ROUTER_METRICS_FLUSH_S": str(FLUSH_S),
               "COMRECYCLE_ROUTER_MAX_INFLIGHT_BATCHES": "4", "COMRECYCLE_FINGERPRINT_CHECK_S": "0.2"}
        with repository_server(repo, startup_timeout=180, env=env) as srv:
            yield {"triton": srv, "redis": redis_srv, "cache": RedisStageCache(redis_srv.url), "repo": repo}


def req(user, viewed=(), t=0.0, **extra):
    r = {"user_id": np.array([user], np.int64), "user_features": np.array([0, 1, 2], np.int64),
         "history": np.array([3, 5], np.int64), "viewed_items": np.asarray(viewed, np.int64),
         "clicked_items": np.zeros(0, np.int64), "request_time": np.array([t], np.float64)}
    r.update({k: np.asarray(v) for k, v in extra.items()})
    return r


def send(stack, reqs):
    async def main():
        async with CascadeClient(stack["triton"].grpc_url, "grpc") as c:
            out = []
            for r in reqs:
                try:
                    out.append(await c.infer(ROUTER, r))
                except ServingError as e:
                    out.append(e)
            return out
    return asyncio.run(main())


def metrics(stack, name: str) -> dict[str, float]:
    """label set -> value of every series of `name`, after the router's next flush."""
    time.sleep(3 * FLUSH_S)
    text = urllib.request.urlopen(stack["triton"].metrics_endpoint, timeout=5).read().decode()
    return {line.split("{", 1)[1].rsplit("}", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith(name + "{")}


def total(series: dict[str, float], **labels) -> float:
    return sum(v for k, v in series.items() if all(f'{a}="{b}"' in k for a, b in labels.items()))


@pytest.mark.parametrize("bad_time", [1e308, -1e308, float("nan")])
def test_a_bad_request_time_is_invalid_and_later_requests_of_the_user_are_served(stack, bad_time):
    user = 500 + int(abs(np.nan_to_num(bad_time)) % 7)
    first = send(stack, [req(user, t=10.0)])[0]
    assert not isinstance(first, Exception)
    bad = send(stack, [req(user, t=bad_time)])[0]
    assert isinstance(bad, ServingError) and "input 'request_time': expected" in str(bad)
    later = send(stack, [req(user, t=20.0 + k) for k in range(3)])
    assert not any(isinstance(r, Exception) for r in later), later
    assert int(later[0]["strategy"][0]) == 3  # its cache is intact


def test_keys_that_are_not_entries_are_repaired_and_the_user_is_served(stack):
    r = redis.Redis.from_url(stack["redis"].url)
    cache = stack["cache"]
    users = {601: lambda k: r.rpush(k, "x"), 602: lambda k: r.hset(k, "f", "v"),
             603: lambda k: r.set(k, b"\0" * (10 * 2**20))}  # a 10 MB value
    before = total(metrics(stack, "comrecycle_router_events_total"), event="repaired")
    for u, put in users.items():
        put(cache.entry_key(u))
    first = send(stack, [req(u, t=1.0) for u in users])
    assert all(int(x["strategy"][0]) == 0 for x in first)
    assert total(metrics(stack, "comrecycle_router_events_total"), event="repaired") - before == 3
    assert all(r.type(cache.entry_key(u)) == b"string" and r.strlen(cache.entry_key(u)) < 2**16 for u in users)
    again = send(stack, [req(u, t=8.0) for u in users])
    assert all(int(x["strategy"][0]) == 3 for x in again)  # the repaired entries work


def test_lookups_add_up_and_failed_work_is_counted(stack):
    from dataclasses import replace

    from comrecycle.router.entry import encode_entry

    send(stack, [req(703, t=1.0)])
    cache, r = stack["cache"], redis.Redis.from_url(stack["redis"].url)
    e = cache.claim([703], "peek")[0].entry
    cache.release([703], "peek")
    r.set(cache.entry_key(703), encode_entry(replace(e, model_version="other models")))  # a stale entry
    lookups0 = metrics(stack, "comrecycle_cache_lookups_total")
    events0 = metrics(stack, "comrecycle_router_events_total")
    reqs = [req(700, t=1.0), req(701, t=1.0, new_session=[1]), req(702, viewed=[-3], t=1.0), req(700, t=8.0),
            req(703, t=8.0)]
    out = send(stack, reqs)
    assert isinstance(out[2], ServingError) and sum(isinstance(x, Exception) for x in out) == 1
    lookups = metrics(stack, "comrecycle_cache_lookups_total")
    events = metrics(stack, "comrecycle_router_events_total")
    added = sum(lookups.values()) - sum(lookups0.values())
    invalid = total(events, event="invalid") - total(events0, event="invalid")
    assert invalid == 1 and added == len(reqs) - invalid  # one result per look-up, none counted twice
    assert total(lookups, result="stale_version") - total(lookups0, result="stale_version") == 1


@pytest.mark.slow
def test_concurrency_suite_serves_no_cached_item_twice_and_no_viewed_item_again(stack):
    reports = asyncio.run(run_suite(stack["triton"].grpc_url, seconds=30.0, users=24, burst_users=10,
                                    n_bursts=15, burst_size=8))
    lines = "\n".join(r.line() for r in reports)
    assert sum(r.seconds for r in reports) >= 30.0, lines
    for r in reports:
        assert r.failed == 0, (lines, r.first_errors)
        assert r.viewed_again == 0, lines
        assert r.shared_cached_items == 0, lines
        assert r.recycled > 0.05 * r.requests, lines  # the router did recycle: the checks were not vacuous
    print(lines)


def test_a_new_stage_version_stops_the_recycling_of_lists_from_the_old_one(stack):
    """The router's fingerprint follows the stage models' files (latest version + content), so a
    stage reloaded without reloading the router never gets lists computed by its old version."""
    assert [int(x["strategy"][0]) for x in send(stack, [req(800, t=1.0), req(800, t=8.0)])] == [0, 3]
    rank = stack["repo"] / "rank"
    new = rank / str(max(int(v.name) for v in rank.iterdir() if v.name.isdigit()) + 1)
    shutil.copytree(rank / "1", new)  # a new version of the rank stage (same weights, new version)
    try:
        time.sleep(0.5)  # > COMRECYCLE_FINGERPRINT_CHECK_S
        stale0 = total(metrics(stack, "comrecycle_cache_lookups_total"), result="stale_version")
        after = send(stack, [req(800, t=15.0), req(800, t=22.0)])
        assert [int(x["strategy"][0]) for x in after] == [0, 3]  # old lists dropped, the session goes on
        assert total(metrics(stack, "comrecycle_cache_lookups_total"), result="stale_version") == stale0 + 1
    finally:
        shutil.rmtree(new)


def test_feedback_reported_during_a_redis_outage_is_not_lost(stack):
    import os
    import signal

    first = send(stack, [req(900, t=1.0)])[0]
    viewed = first["page_items"][:6]
    os.kill(stack["redis"].pid, signal.SIGSTOP)  # Redis frozen: claims time out (50 ms)
    try:
        during = send(stack, [req(900, viewed=viewed, t=8.0, page_token=first["page_token"])])[0]
    finally:
        os.kill(stack["redis"].pid, signal.SIGCONT)
    assert int(during["strategy"][0]) == 0 and int(during["page_token"][0]) == 0  # not recorded
    assert not set(viewed.tolist()) & set(during["page_items"].tolist())
    time.sleep(2.5)  # > retry_after_s: the router parks what it kept, without waiting for a request
    cache = stack["cache"]
    claim = cache.claim([900], "peek")[0]
    cache.release([900], "peek")
    assert set(viewed.tolist()) <= set(claim.pending.tolist())
    after = send(stack, [req(900, t=15.0)])[0]
    assert not set(viewed.tolist()) & set(after["page_items"].tolist())
    e = cache.claim([900], "peek2")[0].entry
    cache.release([900], "peek2")
    assert set(viewed.tolist()) <= set(e.exposed.tolist())
