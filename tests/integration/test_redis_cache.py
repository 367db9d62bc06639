"""RedisStageCache against a real redis-server (started by RedisServer on free ports): locking,
TTL, corruption, outage and recovery, eviction under maxmemory, and a password."""
import logging
import os
import signal
import time
import uuid

import numpy as np
import pytest
import redis

from comrecycle.router.cache import RedisStageCache
from comrecycle.router.entry import CacheEntry, StageList, encode_entry
from comrecycle.serving.redis_server import RedisServer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server():
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def cache(server):
    # A fresh key prefix per test: tests share the server but never each other's keys.
    c = RedisStageCache(server.url, prefix=f"t{uuid.uuid4().hex[:8]}:")
    yield c
    c.close()


def _entry(seed: int = 0, n: int = 100) -> CacheEntry:
    rng = np.random.default_rng(seed)
    return CacheEntry("v1", 100.0 + seed, 1, rng.integers(0, 10**6, 30), np.arange(20),
                      {"retrieval": StageList(rng.integers(0, 10**6, n), 99.0, 1),
                       "rank": StageList(np.arange(10), 99.5, 1)})


def test_miss_commit_hit_returns_the_same_entry(cache):
    assert [c.status for c in cache.claim([1, 2], "a")] == ["miss", "miss"]
    assert cache.commit({1: _entry(1), 2: _entry(2)}, "a")
    claims = cache.claim([2, 1, 3], "b")
    assert [c.status for c in claims] == ["hit", "hit", "miss"]
    assert claims[0].entry == _entry(2) and claims[1].entry == _entry(1) and claims[2].entry is None
    assert cache.commit({1: None}, "b", release=[2, 3])  # None deletes
    assert [c.status for c in cache.claim([1, 2], "c")] == ["miss", "hit"]
    s = cache.stats
    assert (s["hits"], s["misses"], s["writes"], s["errors"], s["write_errors"]) == (3, 4, 3, 0, 0)


def test_new_sessions_take_the_lock_read_nothing_and_drop_the_old_feedback(cache, server):
    assert cache.claim([7], "a")[0].status == "miss"
    assert cache.commit({7: _entry(7)}, "a")
    # a busy request parks its viewed items; a new session then starts over them
    assert cache.claim([7], "in-flight")[0].status == "hit"
    busy = cache.claim([7], "b", viewed=[np.array([11, 12])])[0]
    assert busy.status == "busy" and busy.entry == _entry(7)  # read without the lock, for exclusions
    np.testing.assert_array_equal(busy.pending, [11, 12])
    cache.release([7], "in-flight")
    fresh = cache.claim([7, 8], "c", new_session=[True, True])
    assert [c.status for c in fresh] == ["miss", "miss"] and fresh[0].entry is None and fresh[0].pending.size == 0
    assert cache.claim([7], "d", new_session=[True])[0].status == "busy"  # c holds it until its commit
    assert redis.Redis.from_url(server.url).exists(cache.parked_key(7)) == 0  # the old session's feedback
    assert cache.commit({7: _entry(17), 8: _entry(8)}, "c")
    claims = cache.claim([7, 8], "e")
    assert claims[0].entry == _entry(17) and claims[1].entry == _entry(8)
    ttl_ms = redis.Redis.from_url(server.url).pttl(cache.entry_key(8))
    assert 0 < ttl_ms <= cache.ttl_s * 1000


def test_feedback_parked_by_busy_requests_reaches_the_next_holder(cache, server):
    assert cache.claim([3], "a")[0].status == "miss"
    first = cache.claim([3], "b", viewed=[np.array([5, 6])])[0]
    second = cache.claim([3], "c", viewed=[np.array([7])])[0]
    assert first.status == second.status == "busy"
    np.testing.assert_array_equal(second.pending, [5, 6, 7])
    assert cache.commit({3: _entry(3)}, "a")
    holder = cache.claim([3], "d")[0]
    assert holder.status == "hit"
    np.testing.assert_array_equal(holder.pending, [5, 6, 7])  # taken over...
    assert cache.commit({3: _entry(3)}, "d", parked_lens={3: holder.parked_len})
    assert redis.Redis.from_url(server.url).exists(cache.parked_key(3)) == 0  # ...and gone once written
    # what a holder applies (taken over + its own viewed items) stays visible to the requests that
    # find its lock held, until its write-back trims exactly that prefix
    cache.claim([3], "x", viewed=[np.array([1, 2])])  # busy: parks 1, 2
    cache.release([3], "x")
    holder = cache.claim([3], "e", viewed=[np.array([9])])[0]
    assert holder.status == "hit" and holder.parked_len == 3 * 8
    np.testing.assert_array_equal(holder.pending, [1, 2])
    np.testing.assert_array_equal(cache.claim([3], "f", viewed=[np.array([4])])[0].pending, [1, 2, 9, 4])
    assert cache.commit({3: _entry(3)}, "e", parked_lens={3: holder.parked_len})
    np.testing.assert_array_equal(cache.claim([3], "g")[0].pending, [4])  # parked after the claim: kept
    cache.release([3], "g")


def test_redis_down_reports_failure_for_every_operation():
    cache = RedisStageCache("redis://127.0.0.1:1/0", timeout_s=0.05, retry_after_s=5.0)
    assert [c.status for c in cache.claim([1], "a")] == ["error"]
    assert not cache.commit({1: _entry()}, "a")
    assert not cache.commit({1: _entry()}, "a")  # circuit open: no network
    assert cache.extend([1], "a") == 0
    assert cache.stats["write_errors"] == 2


def test_duplicate_user_in_a_batch_is_busy_and_locks_are_released_by_commit(cache):
    assert [c.status for c in cache.claim([5, 6, 5], "a")] == ["miss", "miss", "busy"]
    assert [c.status for c in cache.claim([5], "b")] == ["busy"]  # a concurrent request
    assert cache.commit({5: _entry()}, "a", release=[6])
    assert [c.status for c in cache.claim([5, 6], "c")] == ["hit", "miss"]
    cache.release([5, 6], "c")
    assert [c.status for c in cache.claim([5, 6], "d")] == ["hit", "miss"]
    assert cache.stats["busy"] == 2


def test_a_stale_token_does_not_release_someone_elses_lock(server):
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    cache = RedisStageCache(server.url, lock_ms=100, prefix=prefix)
    other = RedisStageCache(server.url, lock_ms=10_000, prefix=prefix)  # another router instance
    assert cache.claim([7], "old")[0].status == "miss"
    time.sleep(0.2)  # "old" took too long: its lock expired
    assert other.claim([7], "new")[0].status == "miss"
    result = cache.commit({7: _entry()}, "old")  # the late writer must not overwrite "new"'s state
    assert result.ok and (result.stored, result.lost) == (0, 1) and cache.stats["lost_writes"] == 1
    # with the stamp of what it read it would still lose: "new" holds the lock
    assert cache.commit({7: _entry()}, "old", stamps={7: b""}).lost == 1
    cache.release([7], "old")
    assert cache.claim([7], "third")[0].status == "busy"  # "new" keeps the lock
    raw = redis.Redis.from_url(server.url).get(cache.lock_key(7))
    assert raw == b"new"
    assert redis.Redis.from_url(server.url).get(cache.entry_key(7)) is None


def test_a_write_whose_lock_expired_lands_only_if_nobody_changed_the_entry(server):
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    cache = RedisStageCache(server.url, lock_ms=100, prefix=prefix)
    assert cache.claim([8], "a")[0].status == "miss"
    assert cache.commit({8: _entry(1)}, "a")
    c = cache.claim([8], "slow")[0]
    time.sleep(0.2)  # its lock expired; nobody else came: the write lands
    assert cache.commit({8: _entry(2)}, "slow", stamps={8: c.stamp}).stored == 1
    c = cache.claim([8], "slow2")[0]
    time.sleep(0.2)
    other = cache.claim([8], "fast")[0]  # another request of the user claims, writes, releases
    assert cache.commit({8: _entry(3)}, "fast", stamps={8: other.stamp}).stored == 1
    result = cache.commit({8: _entry(4)}, "slow2", stamps={8: c.stamp})  # the entry changed: lost
    assert (result.stored, result.lost) == (0, 1)
    assert cache.claim([8], "check")[0].entry == _entry(3)


def test_extend_keeps_a_long_batch_s_locks(server):
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    cache = RedisStageCache(server.url, lock_ms=300, prefix=prefix)
    assert cache.claim([4, 5], "long")[0].status == "miss"
    for _ in range(4):  # 0.8 s, well past lock_ms, extended every 0.2 s
        time.sleep(0.2)
        assert cache.extend([4, 5], "long") == 2
    assert cache.claim([4], "other")[0].status == "busy"
    assert cache.extend([4], "not-mine") == 0
    result = cache.commit({4: _entry(4)}, "long", release=[5])
    assert (result.stored, result.lost) == (1, 0)
    assert cache.claim([4, 5], "next")[0].entry == _entry(4)


def test_keys_that_hold_no_entry_of_ours_are_deleted_and_counted(server, cache, caplog):
    r = redis.Redis.from_url(server.url)
    r.rpush(cache.entry_key(20), "a", "b")
    r.hset(cache.entry_key(21), "f", "v")
    r.sadd(cache.entry_key(22), "x")
    r.set(cache.entry_key(23), b"\0" * (cache.max_entry_bytes + 1))
    r.set(cache.entry_key(24), encode_entry(_entry(24)))
    with caplog.at_level(logging.WARNING, logger="comrecycle.router.cache"):
        claims = cache.claim([20, 21, 22, 23, 24], "a")
    assert [c.status for c in claims] == ["corrupt"] * 4 + ["hit"]
    assert [c.repaired for c in claims] == ["wrong_type"] * 3 + ["oversize", None]
    assert cache.stats["repaired"] == 4 and "another Redis type" in caplog.text and "bytes" in caplog.text
    assert all(r.exists(cache.entry_key(u)) == 0 for u in (20, 21, 22, 23))
    assert cache.commit({u: _entry(u) for u in (20, 21, 22, 23)}, "a", release=[24])
    assert [c.status for c in cache.claim([20, 21, 22, 23], "b")] == ["hit"] * 4


def test_entries_expire_after_the_ttl(server):
    cache = RedisStageCache(server.url, ttl_s=1, prefix=f"t{uuid.uuid4().hex[:8]}:")
    cache.claim([8], "a")
    assert cache.commit({8: _entry()}, "a")
    assert cache.claim([8], "b")[0].status == "hit"
    cache.release([8], "b")
    time.sleep(1.5)
    assert cache.claim([8], "c")[0].status == "miss"


def test_corrupt_bytes_are_reported_and_counted(server, cache, caplog):
    r = redis.Redis.from_url(server.url)
    good = encode_entry(_entry())
    r.set(cache.entry_key(9), good[:-3])
    r.set(cache.entry_key(10), b"\x80\x04garbage")
    with caplog.at_level(logging.WARNING, logger="comrecycle.router.cache"):
        claims = cache.claim([9, 10], "a")
    assert [c.status for c in claims] == ["corrupt", "corrupt"] and claims[0].entry is None
    assert cache.stats["corrupt"] == 2
    assert "user 9" in caplog.text and "truncated" in caplog.text and "magic" in caplog.text
    assert cache.commit({9: _entry()}, "a", release=[10])  # the corrupt entry is replaced
    assert cache.claim([9], "b")[0].status == "hit"


def test_dead_redis_answers_error_fast_then_recovers(caplog):
    # Its own server: this test kills it.
    with RedisServer() as srv:
        cache = RedisStageCache(srv.url, retry_after_s=0.2)
        assert cache.claim([1], "a")[0].status == "miss" and cache.commit({1: _entry()}, "a")
        srv.kill()
        users = list(range(100))
        with caplog.at_level(logging.INFO, logger="comrecycle.router.cache"):
            t0 = time.monotonic()
            claims = cache.claim(users, "b")
            first = time.monotonic() - t0
            assert [c.status for c in claims] == ["error"] * 100 and first < 0.5
            t0 = time.monotonic()
            for _ in range(20):  # the circuit is open: no network, no timeout
                assert cache.claim(users, "c")[0].status == "error"
                assert not cache.commit({1: _entry()}, "c")
            assert time.monotonic() - t0 < 0.1
            cache.release([1], "c")
            assert cache.ping() is False
            time.sleep(0.25)
            assert cache.claim([1], "d")[0].status == "error"  # tried again: still down
            s = cache.stats
            assert s["errors"] == 100 + 20 * 100 + 1 and s["write_errors"] == 20
            assert 2 <= s["circuit_opens"] <= 3  # 2 unless the loop above outlasted retry_after_s
            warnings = [r for r in caplog.records if r.name == "comrecycle.router.cache" and r.levelno == logging.WARNING]
            assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()  # one per outage

            srv.restart()  # same port, empty
            time.sleep(0.25)
            assert cache.claim([1], "f")[0].status == "miss"
            assert cache.commit({1: _entry()}, "f") and cache.claim([1], "g")[0].status == "hit"
        assert any(r.levelno == logging.INFO and "answers again" in r.getMessage() for r in caplog.records)


def test_a_frozen_redis_costs_one_timeout():
    """A server that accepts but never answers (SIGSTOP) costs one timeout_s, then the circuit."""
    with RedisServer() as srv:
        cache = RedisStageCache(srv.url, timeout_s=0.05, retry_after_s=5.0)
        assert cache.ping()
        os.kill(srv.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            assert {c.status for c in cache.claim(range(50), "a")} == {"error"}
            assert {c.status for c in cache.claim(range(50), "b")} == {"error"}
            assert time.monotonic() - t0 < 0.3
        finally:
            os.kill(srv.pid, signal.SIGCONT)
        assert cache.ping() is True  # a successful probe closes the circuit
        # Redis ran the timed-out batch "a" once it woke up: its locks stay until lock_ms.
        assert [c.status for c in cache.claim([1, 999], "c")] == ["busy", "miss"]


def test_maxmemory_evicts_instead_of_failing():
    with RedisServer(maxmemory="2mb") as srv:
        cache = RedisStageCache(srv.url, timeout_s=1.0)
        for start in range(0, 2000, 50):
            users = list(range(start, start + 50))
            claims = cache.claim(users, "t")
            assert {c.status for c in claims} <= {"miss", "hit"}
            stamps = {u: c.stamp for u, c in zip(users, claims)}
            # ~10 KB each; locks may be evicted too (allkeys-lru): the stamps let the writes land
            assert cache.commit({u: _entry(u % 7, n=1200) for u in users}, "t", stamps=stamps)
        info = redis.Redis.from_url(srv.url).info("memory")
        stats = redis.Redis.from_url(srv.url).info("stats")
        assert info["used_memory"] < 3 * 2**20 and stats["evicted_keys"] > 1000
        assert cache.stats["writes"] == 2000 and cache.stats["write_errors"] == 0


def test_password_protected_server():
    with RedisServer(password="s3cret") as srv:
        assert ":s3cret@" in srv.url
        with_pw = RedisStageCache(srv.url)
        assert with_pw.ping() and with_pw.claim([1], "a")[0].status == "miss"
        assert with_pw.commit({1: _entry()}, "a")
        bare = srv.url.replace(":s3cret@", "")
        assert RedisStageCache(bare).claim([1], "b")[0].status == "error"
        assert RedisStageCache(srv.url.replace("s3cret", "wrong")).claim([1], "b")[0].status == "error"
        override = RedisStageCache(bare, password="s3cret")  # the keyword wins over the URL
        assert override.claim([1], "c")[0].status == "hit"
        assert "s3cret" not in repr(override) and "s3cret" not in override.url


def test_an_entry_that_cannot_be_encoded_deletes_the_key_and_keeps_the_parked_feedback(cache, server):
    assert cache.claim([40], "a")[0].status == "miss"
    assert cache.commit({40: _entry(40)}, "a")
    holder = cache.claim([40], "b", viewed=[np.array([4, 5])])[0]
    bad = CacheEntry("v1", float("nan"), 1, np.zeros(0, np.int64), np.zeros(0, np.int64), {})
    result = cache.commit({40: bad}, "b", parked_lens={40: holder.parked_len})
    assert not result.ok and result.stored == 1  # the key deleted (the old entry no longer matches)
    r = redis.Redis.from_url(server.url)
    assert r.exists(cache.entry_key(40)) == 0 and r.exists(cache.lock_key(40)) == 0
    np.testing.assert_array_equal(cache.claim([40], "c")[0].pending, [4, 5])  # not trimmed
    cache.release([40], "c")
