"""The router's per-user stage cache: a compact binary codec and a Redis client around it.

Per user ``uid`` two keys live in Redis:

* ``{prefix}u:{uid}``    the user's :class:`CacheEntry`, encoded by :func:`encode_entry`,
  expiring ``ttl_s`` after its last write;
* ``{prefix}lock:{uid}`` a short lock (``lock_ms``, extended while the batch runs) holding the
  token of the batch that serves the user's request right now, so that two in-flight requests
  of one user never both recycle (and serve) the same cached items;
* ``{prefix}fb:{uid}``   viewed items parked by requests that found the lock held (packed int64),
  taken over and applied by the next request that holds the lock: no feedback is dropped.

A batch makes two round trips: :meth:`RedisStageCache.claim` (lock + read, for new sessions
too) before serving and :meth:`RedisStageCache.commit` (write + unlock) after it, each one Lua
script call for the whole batch (one command to pack and one reply to parse, instead of two per
user). A write-back happens only while the batch still holds the user's lock
(:meth:`RedisStageCache.extend` keeps it alive during long batches); a key of the wrong Redis
type or larger than ``max_entry_bytes`` is deleted at the claim and counted. Redis is an
optimisation, never a dependency: when it is down or slow every claim answers ``"error"`` (the
router then runs the full cascade) and a circuit breaker skips Redis for ``retry_after_s`` so
that a dead server does not add a timeout to every batch.

The entry and its codec: router.entry; the Lua scripts: router.cache_lua; the in-memory twin
with the same rules: router.memory_cache.
"""
from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from typing import Mapping, Sequence

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..specs import EXCLUDE_MAX
from ..errors import UserError

from .cache_lua import CLAIM_LUA, COMMIT_LUA, EXTEND_LUA, RELEASE_LUA
from .entry import (CACHED_STAGES, CLAIM_STATUSES, ENTRY_MAX_BYTES, ID_DTYPE, NO_IDS, RECENT_PAGES, STAMP, CacheEntry,
                    Claim, CommitResult, CorruptEntry, StageList, decode_entry, encode_entry, encode_payloads)

LOG = logging.getLogger("comrecycle.router.cache")

__all__ = [
    "CACHED_STAGES", "CLAIM_STATUSES", "CacheEntry", "Claim", "CommitResult", "CorruptEntry", "RECENT_PAGES",
    "RedisStageCache", "StageList", "decode_entry", "encode_entry", "redact_url",
]


_COUNTERS = ("hits", "misses", "busy", "corrupt", "errors", "write_errors", "writes", "lost_writes", "repaired",
             "circuit_opens")
_REPAIRED = {1: "wrong_type", 2: "oversize"}
_STATUS_COUNTER = {"hit": "hits", "miss": "misses", "busy": "busy", "corrupt": "corrupt", "error": "errors"}


def _with_password(url: str, password: str) -> str:
    """``url`` with its password replaced (redis-py lets a URL's password win over keywords)."""
    parts = urllib.parse.urlsplit(url)
    user = urllib.parse.quote(urllib.parse.unquote(parts.username or ""), safe="")
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{user}:{urllib.parse.quote(password, safe='')}@{host}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def redact_url(url: str) -> str:
    """``url`` with its password masked, for logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _parked_ids(raw) -> np.ndarray:
    """The ids of a parked-feedback value (packed int64; a torn tail is ignored, negatives dropped)."""
    if not raw:
        return NO_IDS
    raw = bytes(raw)
    ids = np.frombuffer(raw[:len(raw) - len(raw) % ID_DTYPE.itemsize], ID_DTYPE).astype(np.int64)
    return ids[ids >= 0]


class RedisStageCache:
    """The per-user stage cache of one router model instance (thread-safe).

    Never raises on Redis trouble: claims answer ``"error"`` and commits ``False``. After a
    failure the circuit opens for ``retry_after_s`` (calls answer at once, without the network);
    the first call after that tries Redis again, so the cache recovers by itself.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, ttl_s: float = 900.0, lock_ms: int = 2000,
                 timeout_s: float = 0.05, retry_after_s: float = 1.0, prefix: str = "comrecycle:",
                 password: str | None = None, max_entry_bytes: int = ENTRY_MAX_BYTES):
        """``url``: ``redis://`` or ``rediss://`` (TLS), optionally ``user:password@``; ``password``
        overrides the URL's. ``timeout_s`` bounds connecting and every reply."""
        if not ttl_s > 0 or not lock_ms > 0 or not timeout_s > 0 or not retry_after_s >= 0:
            raise UserError(f"expected ttl_s > 0, lock_ms > 0, timeout_s > 0, retry_after_s >= 0; found "
                             f"{ttl_s}, {lock_ms}, {timeout_s}, {retry_after_s}")
        if password is not None:
            url = _with_password(url, password)
        self.url = redact_url(url)
        self.ttl_s, self.lock_ms, self.timeout_s = float(ttl_s), int(lock_ms), float(timeout_s)
        self.retry_after_s, self.prefix = float(retry_after_s), prefix
        self.max_entry_bytes = int(max_entry_bytes)
        self._ttl_ms = max(1, round(self.ttl_s * 1000))  # PX, not EX: fractional TTLs (tests) work
        # No retries: redis-py's default (3 with backoff) would multiply the timeout; the
        # circuit breaker is the retry policy.
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False,
            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._release_script = self._client.register_script(RELEASE_LUA)
        self._claim_script = self._client.register_script(CLAIM_LUA)
        self._commit_script = self._client.register_script(COMMIT_LUA)
        self._extend_script = self._client.register_script(EXTEND_LUA)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._open_until = 0.0  # time.monotonic() before which Redis is not tried
        self._down_since: float | None = None  # set while Redis is failing (log once per outage)

    def __repr__(self) -> str:
        return f"RedisStageCache({self.url!r}, prefix={self.prefix!r})"

    # -- keys -----------------------------------------------------------------------------
    def entry_key(self, uid: int) -> str:
        return f"{self.prefix}u:{uid}"

    def lock_key(self, uid: int) -> str:
        return f"{self.prefix}lock:{uid}"

    def parked_key(self, uid: int) -> str:
        return f"{self.prefix}fb:{uid}"

    # -- the two round trips of a batch -----------------------------------------------------
    def claim(self, user_ids: Sequence[int], token: str, viewed: Sequence[np.ndarray] | None = None,
              new_session: Sequence[bool] | None = None) -> list[Claim]:
        """Lock and read the users' entries in one script call: a :class:`Claim` per user, in order.

        ``viewed[k]``: the items user k reports viewed on its previous page; parked in Redis when
        the lock is held by another request (its successor under the lock applies them).
        ``new_session[k]``: a new session takes the lock but reads nothing (its state starts afresh;
        feedback parked by the old session is dropped).
        A duplicate user in the batch is "busy" after its first occurrence (its lock is taken).
        "hit"/"miss"/"corrupt" claims hold the lock until commit/release (or ``lock_ms``, extended
        by :meth:`extend`). After a timeout Redis may still run the batch, so "error" users can stay
        locked ("busy") for up to ``lock_ms``: harmless, a busy user is served by the full cascade."""
        uids = [int(u) for u in user_ids]
        if not uids:
            return []
        if self._circuit_open():
            return self._errors(len(uids))
        viewed = [NO_IDS] * len(uids) if viewed is None else viewed
        modes = ["o"] * len(uids) if new_session is None else ["n" if n else "o" for n in new_session]
        try:
            keys = [k for uid in uids for k in (self.lock_key(uid), self.entry_key(uid), self.parked_key(uid))]
            args = [token, self.lock_ms, self.max_entry_bytes, self._ttl_ms, EXCLUDE_MAX * ID_DTYPE.itemsize]
            for mode, v in zip(modes, viewed):
                args += [mode, np.asarray(v, ID_DTYPE).tobytes()]
            replies = self._claim_script(keys=keys, args=args)
        except Exception as exc:  # whatever breaks talking to Redis must not fail the batch
            self._failed("claim", exc)
            return self._errors(len(uids))
        self._recovered()
        claims = [self._claim_of(uid, reply) for uid, reply in zip(uids, replies)]
        self._count_claims(claims)
        return claims

    def _claim_of(self, uid: int, reply) -> Claim:
        locked, raw, parked, repaired, parked_len = reply
        repaired = _REPAIRED.get(int(repaired))
        if repaired:
            LOG.warning("user %d: %s held %s, not a cache entry; deleted", uid, self.entry_key(uid),
                        "another Redis type" if repaired == "wrong_type" else
                        f"a value over {self.max_entry_bytes} bytes")
        pending = _parked_ids(parked)
        entry, corrupt = None, False
        if raw:
            try:
                entry = decode_entry(raw)
            except CorruptEntry as exc:
                LOG.warning("user %d: cached entry under %s is corrupt (%s); treated as a miss",
                            uid, self.entry_key(uid), exc)
                corrupt = True
        if not int(locked):
            return Claim("busy", entry, pending, repaired)
        status = "corrupt" if corrupt or repaired else ("hit" if entry is not None else "miss")
        return Claim(status, entry, pending, repaired, bytes(raw[:STAMP.size]) if raw else b"", int(parked_len))

    def commit(self, writes: Mapping[int, CacheEntry | None], token: str, release: Sequence[int] = (),
               stamps: Mapping[int, bytes] | None = None, parked_lens: Mapping[int, int] | None = None) -> CommitResult:
        """Store (``None``: delete) the users' entries while their locks still hold ``token``, release
        those locks and the ones of ``release``, in one script call. ``parked_lens[uid]``: the
        :attr:`Claim.parked_len` of the claim; that prefix of the parked feedback, now in the entry,
        is trimmed.

        ``stamps[uid]``: the :attr:`Claim.stamp` of the entry the batch read; with it, a write whose
        lock is gone (expired, evicted) still lands if nobody holds the lock and the entry is
        unchanged. A write that lost the race (another request of the user holds the lock or
        changed the entry) is skipped and counted (``lost``). An entry that cannot be encoded is
        logged and its key deleted (the old entry no longer matches what was served)."""
        payloads, invalid = encode_payloads(writes)
        unlock = [u for u in dict.fromkeys(int(u) for u in release) if u not in payloads]
        if not payloads and not unlock:
            return CommitResult(True)
        if self._circuit_open():
            self._add(write_errors=len(payloads))
            return CommitResult(False)
        try:
            keys = [k for u in payloads for k in (self.entry_key(u), self.lock_key(u), self.parked_key(u))]
            keys += [self.lock_key(u) for u in unlock]
            expect = [b"-" if stamps is None or u not in stamps else stamps[u] for u in payloads]
            applied = [0 if u in invalid else int((parked_lens or {}).get(u, 0)) for u in payloads]
            written, lost = self._commit_script(keys=keys, args=[token, self._ttl_ms, len(payloads),
                                                                 *payloads.values(), *expect, *applied])
        except Exception as exc:  # see claim()
            self._failed("commit", exc)
            self._add(write_errors=len(payloads))
            return CommitResult(False)
        self._recovered()
        written, lost = int(written), int(lost)
        if lost:
            LOG.warning("%d cache write(s) skipped: the batch no longer held the user's lock (lock_ms %d too "
                        "short for this batch?)", lost, self.lock_ms)
        self._add(writes=written - min(len(invalid), written), write_errors=len(invalid), lost_writes=lost)
        return CommitResult(not invalid, written, lost)

    def park(self, viewed: Mapping[int, np.ndarray]) -> bool:
        """Append viewed items to the users' parked feedback (one pipelined round trip): what a router
        kept while Redis was unavailable reaches the users' next holders. True when stored."""
        items = {int(u): np.asarray(v, ID_DTYPE) for u, v in viewed.items() if len(v)}
        if not items:
            return True
        if self._circuit_open():
            return False
        try:
            pipe = self._client.pipeline(transaction=False)
            for u, v in items.items():
                pipe.append(self.parked_key(u), v.tobytes())
                pipe.pexpire(self.parked_key(u), self._ttl_ms)
            pipe.execute()
        except Exception as exc:  # see claim()
            self._failed("park", exc)
            return False
        self._recovered()
        return True

    def extend(self, user_ids: Sequence[int], token: str) -> int:
        """Extend the users' locks that still hold ``token`` by ``lock_ms`` (a long batch keeps its
        users); returns how many were extended, 0 when Redis is unavailable (never raises)."""
        keys = [self.lock_key(int(u)) for u in dict.fromkeys(user_ids)]
        if not keys or self._circuit_open():
            return 0
        try:
            n = int(self._extend_script(keys=keys, args=[token, self.lock_ms]))
        except Exception as exc:  # see claim()
            self._failed("extend", exc)
            return 0
        self._recovered()
        return n

    def release(self, user_ids: Sequence[int], token: str) -> None:
        """Release the users' locks that still hold ``token`` (an abandoned claim); never raises."""
        keys = [self.lock_key(int(u)) for u in dict.fromkeys(user_ids)]
        if not keys or self._circuit_open():
            return  # with Redis away the locks simply expire after lock_ms
        try:
            self._release_script(keys=keys, args=[token])
        except Exception as exc:  # see claim()
            self._failed("release", exc)
            return
        self._recovered()

    def ping(self) -> bool:
        """True when Redis answers now (ignores and, on success, closes the circuit). Also loads
        the claim/commit/release scripts, so that the first batches run EVALSHA directly."""
        try:
            self._client.ping()
            for script in (self._claim_script, self._commit_script, self._extend_script, self._release_script):
                self._client.script_load(script.script)
        except Exception:  # a health probe: any failure is a "no"
            return False
        self._recovered()
        return True

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    @property
    def stats(self) -> dict[str, int]:
        """Counters since start: hits, misses, busy, corrupt, errors (claims answered "error"),
        write_errors and writes (entries), circuit_opens."""
        with self._lock:
            return dict(self._counts)

    # -- internals --------------------------------------------------------------------------
    def _add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                self._counts[name] += n

    def _count_claims(self, claims: list[Claim]) -> None:
        with self._lock:
            for c in claims:
                self._counts[_STATUS_COUNTER[c.status]] += 1
                self._counts["repaired"] += c.repaired is not None

    def _errors(self, n: int) -> list[Claim]:
        self._add(errors=n)
        return [Claim("error")] * n

    def _circuit_open(self) -> bool:
        return time.monotonic() < self._open_until

    def _failed(self, op: str, exc: Exception) -> None:
        now = time.monotonic()
        with self._lock:
            self._open_until = now + self.retry_after_s
            self._counts["circuit_opens"] += 1
            first = self._down_since is None
            if first:
                self._down_since = now
        if first:
            # Redis errors are expected operational events (no traceback); anything else is a bug.
            expected = isinstance(exc, (redis.RedisError, OSError))
            LOG.warning("Redis %s unavailable (%s failed: %s: %s); serving without the cache, retrying "
                        "every %.1f s", self.url, op, type(exc).__name__, exc, self.retry_after_s,
                        exc_info=None if expected else exc)
        else:
            LOG.debug("Redis %s still unavailable (%s failed: %s)", self.url, op, exc)

    def _recovered(self) -> None:
        if self._down_since is None:  # the common case: no lock taken
            return
        with self._lock:
            since, self._down_since, self._open_until = self._down_since, None, 0.0
        if since is not None:
            LOG.info("Redis %s answers again after %.1f s; cache back in use", self.url,
                     time.monotonic() - since)
