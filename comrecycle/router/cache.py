"""The router's per-user stage cache: a compact binary codec and a Redis client around it.

Per user ``uid`` two keys live in Redis:

* ``{prefix}u:{uid}``    the user's :class:`CacheEntry`, encoded by :func:`encode_entry`,
  expiring ``ttl_s`` after its last write;
* ``{prefix}lock:{uid}`` a short lock (``lock_ms``) holding the token of the batch that serves
  the user's request right now, so that two in-flight requests of one user never both recycle
  (and serve) the same cached items.

A batch makes two round trips: :meth:`RedisStageCache.claim` (lock + read) before serving and
:meth:`RedisStageCache.commit` (write + unlock) after it, each one Lua script call for the whole
batch (one command to pack and one reply to parse, instead of two per user). Redis is an
optimisation, never a dependency: when it is down or slow every claim answers ``"error"`` (the
router then runs the full cascade) and a circuit breaker skips Redis for ``retry_after_s`` so
that a dead server does not add a timeout to every batch.

Wire format of an entry (all little-endian; never pickle)::

    "CRE1" | crc32 u32 (of everything after it)
    | last_ts f64 | page i32 | n_exposed u32 | n_last_page u16 | version_len u8 | n_lists u8
    | version utf-8 [version_len] | exposed i64 [n_exposed] | last_page i64 [n_last_page]
    | n_lists x ( stage code u8 | ts f64 | pages i32 | n_items u32 | items i64 [n_items] )

Lists are stored in ``CACHED_STAGES`` order (code = index), so an encoding is canonical.
"""
from __future__ import annotations

import logging
import math
import struct
import threading
import time
import urllib.parse
import zlib
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Mapping, Sequence

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..specs import EXCLUDE_MAX, PAGE_SIZE, STAGES

LOG = logging.getLogger("comrecycle.router.cache")

CACHED_STAGES = STAGES[:-1]  # ("retrieval", "prerank", "rank"): the page itself is not cached
CLAIM_STATUSES = ("hit", "miss", "busy", "corrupt", "error")

MAGIC = b"CRE1"
VERSION_MAX_BYTES = 255
LIST_MAX = 65_536  # bound on a cached list's length (top-k are ~1000); caps what a corrupt count can claim
_INT32_MAX = 2**31 - 1
_INT64_MAX = 2**63 - 1
_ID = np.dtype("<i8")
_PREFIX = struct.Struct("<4sI")  # magic, crc32
_HEADER = struct.Struct("<diIHBB")  # last_ts, page, n_exposed, n_last_page, version_len, n_lists
_LIST_HEADER = struct.Struct("<BdiI")  # stage code, ts, pages, n_items

__all__ = [
    "CACHED_STAGES", "CLAIM_STATUSES", "CacheEntry", "Claim", "CorruptEntry", "RedisStageCache",
    "StageList", "decode_entry", "encode_entry", "redact_url",
]


# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------

@dataclass(eq=False)
class StageList:
    """One cached stage output of a user.

    items  int64 [n]  remaining candidate ids (viewed ones already removed), best first
    ts     float      time (s) the list was computed
    pages  int        pages served from it (1 = the page it was computed for)
    """

    items: np.ndarray
    ts: float
    pages: int

    def __eq__(self, other: object) -> bool:  # arrays compare by value (dataclass eq would be ambiguous)
        if not isinstance(other, StageList):
            return NotImplemented
        return self.ts == other.ts and self.pages == other.pages and np.array_equal(self.items, other.items)


@dataclass(eq=False)
class CacheEntry:
    """Everything the router keeps about a user between two pages of a session.

    model_version  str                    fingerprint of the models that produced the lists (utf-8, <= 255 bytes)
    last_ts        float                  time (s) of the user's last served request
    page           int                    pages served in this session so far
    exposed        int64 [n <= 2000]      items the user viewed in this session, most recent last
    last_page      int64 [<= PAGE_SIZE]   the items served on the last page
    lists          {stage: StageList}     a subset of CACHED_STAGES
    """

    model_version: str
    last_ts: float
    page: int
    exposed: np.ndarray
    last_page: np.ndarray
    lists: dict[str, StageList]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CacheEntry):
            return NotImplemented
        return (self.model_version == other.model_version and self.last_ts == other.last_ts
                and self.page == other.page and np.array_equal(self.exposed, other.exposed)
                and np.array_equal(self.last_page, other.last_page) and self.lists == other.lists)


@dataclass(frozen=True)
class Claim:
    """The answer of :meth:`RedisStageCache.claim` for one user.

    status  "hit" | "miss" | "corrupt": the caller holds the user's lock and must commit or release it;
            "busy": another in-flight request holds it; "error": Redis could not be used.
    entry   the decoded entry for "hit", else None
    """

    status: str
    entry: CacheEntry | None = None


class CorruptEntry(ValueError):
    """Bytes that are not a valid encoded :class:`CacheEntry` (the message says what was
    expected and what was found)."""


# --------------------------------------------------------------------------------------------
# Codec
# --------------------------------------------------------------------------------------------

def _ids(name: str, value, limit: int, err: type[ValueError]) -> np.ndarray:
    """``value`` as a 1-D int64 array of at most ``limit`` ids >= 0, else ``err``."""
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise err(f"{name}: expected a 1-D array of item ids, found shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, np.int64)  # np.array([]) is float64: fine when empty
    if arr.dtype.kind not in "iu":
        raise err(f"{name}: expected int64 item ids, found dtype {arr.dtype}")
    if arr.size > limit:
        raise err(f"{name}: expected at most {limit} ids, found {arr.size}")
    if arr.dtype.kind == "u" and int(arr.max()) > _INT64_MAX:
        raise err(f"{name}: expected ids that fit int64, found {int(arr.max())}")
    arr = arr.astype(np.int64, copy=False)
    lowest = int(arr.min())
    if lowest < 0:
        raise err(f"{name}: expected item ids >= 0, found {lowest}")
    return arr


def _finite(name: str, value, err: type[ValueError]) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise err(f"{name}: expected a finite time in seconds, found {value!r}")
    return float(value)


def _count(name: str, value, err: type[ValueError]) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= value <= _INT32_MAX:
        raise err(f"{name}: expected an integer in 0..{_INT32_MAX}, found {value!r}")
    return int(value)


def _normalized(entry: CacheEntry, err: type[ValueError]) -> CacheEntry:
    """A copy of ``entry`` with int64 arrays and plain floats/ints, lists in CACHED_STAGES order;
    ``err`` names every rule broken. Shared by the encoder (ValueError) and decoder (CorruptEntry)."""
    if not isinstance(entry, CacheEntry):
        raise err(f"expected a CacheEntry, found {type(entry).__name__}")
    if not isinstance(entry.model_version, str):
        raise err(f"model_version: expected str, found {type(entry.model_version).__name__}")
    try:
        n_version = len(entry.model_version.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise err(f"model_version: expected text encodable as utf-8, found {exc.reason}") from None
    if n_version > VERSION_MAX_BYTES:
        raise err(f"model_version: expected at most {VERSION_MAX_BYTES} utf-8 bytes, found {n_version}")
    if not isinstance(entry.lists, Mapping):
        raise err(f"lists: expected a dict stage -> StageList, found {type(entry.lists).__name__}")
    unknown = [s for s in entry.lists if s not in CACHED_STAGES]
    if unknown:
        raise err(f"lists: expected stages among {CACHED_STAGES}, found {unknown}")
    lists = {}
    for stage in CACHED_STAGES:
        if stage in entry.lists:
            lst = entry.lists[stage]
            if not isinstance(lst, StageList):
                raise err(f"lists[{stage!r}]: expected a StageList, found {type(lst).__name__}")
            lists[stage] = StageList(_ids(f"lists[{stage!r}].items", lst.items, LIST_MAX, err),
                                     _finite(f"lists[{stage!r}].ts", lst.ts, err),
                                     _count(f"lists[{stage!r}].pages", lst.pages, err))
    return CacheEntry(entry.model_version, _finite("last_ts", entry.last_ts, err),
                      _count("page", entry.page, err), _ids("exposed", entry.exposed, EXCLUDE_MAX, err),
                      _ids("last_page", entry.last_page, PAGE_SIZE, err), lists)


def encode_entry(entry: CacheEntry) -> bytes:
    """The wire bytes of ``entry`` (see the module docstring); ValueError if it breaks a rule
    (non-integer or negative ids, more than EXCLUDE_MAX exposed, NaN times, ...)."""
    e = _normalized(entry, ValueError)
    version = e.model_version.encode("utf-8")
    parts = [_HEADER.pack(e.last_ts, e.page, e.exposed.size, e.last_page.size, len(version), len(e.lists)),
             version, e.exposed.astype(_ID, copy=False).tobytes(), e.last_page.astype(_ID, copy=False).tobytes()]
    for stage, lst in e.lists.items():
        parts.append(_LIST_HEADER.pack(CACHED_STAGES.index(stage), lst.ts, lst.pages, lst.items.size))
        parts.append(lst.items.astype(_ID, copy=False).tobytes())
    body = b"".join(parts)
    return _PREFIX.pack(MAGIC, zlib.crc32(body)) + body


class _Reader:
    """Bounds-checked reads from the front of a byte string."""

    def __init__(self, data: bytes):
        self.data, self.pos = memoryview(data), 0

    def take(self, n: int, what: str) -> memoryview:
        left = len(self.data) - self.pos
        if n > left:
            raise CorruptEntry(f"truncated entry: expected {n} bytes of {what} at offset {self.pos}, "
                               f"found {left}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, st: struct.Struct, what: str) -> tuple:
        return st.unpack(self.take(st.size, what))

    def ids(self, what: str, count: int, limit: int) -> np.ndarray:
        if count > limit:  # checked before reading: a corrupt count must not look like truncation
            raise CorruptEntry(f"{what}: expected at most {limit} ids, found a count of {count}")
        return np.frombuffer(self.take(count * _ID.itemsize, what), _ID).astype(np.int64)


def decode_entry(data: bytes) -> CacheEntry:
    """The :class:`CacheEntry` encoded in ``data``; CorruptEntry for anything else (wrong
    magic, truncated, trailing bytes, bad checksum, unknown stage, out-of-range values)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CorruptEntry(f"expected bytes, found {type(data).__name__}")
    r = _Reader(data)
    magic, crc = r.unpack(_PREFIX, "the prefix")
    if magic != MAGIC:
        raise CorruptEntry(f"expected magic {MAGIC!r}, found {bytes(magic)!r}")
    last_ts, page, n_exposed, n_last, n_version, n_lists = r.unpack(_HEADER, "the header")
    version = bytes(r.take(n_version, "the model version"))
    exposed = r.ids("exposed", n_exposed, EXCLUDE_MAX)
    last_page = r.ids("last_page", n_last, PAGE_SIZE)
    if n_lists > len(CACHED_STAGES):
        raise CorruptEntry(f"expected at most {len(CACHED_STAGES)} stage lists, found {n_lists}")
    lists, prev = {}, -1
    for i in range(n_lists):
        code, ts, pages, n_items = r.unpack(_LIST_HEADER, f"stage list #{i}'s header")
        if code >= len(CACHED_STAGES):
            raise CorruptEntry(f"stage list #{i}: expected a stage code 0..{len(CACHED_STAGES) - 1} "
                               f"{CACHED_STAGES}, found {code}")
        if code <= prev:
            raise CorruptEntry(f"stage list #{i}: expected stage codes in increasing order, found {code} "
                               f"after {prev}")
        prev = code
        stage = CACHED_STAGES[code]
        lists[stage] = StageList(r.ids(f"lists[{stage!r}].items", n_items, LIST_MAX), ts, pages)
    if r.pos != len(r.data):
        raise CorruptEntry(f"expected the entry to end at byte {r.pos}, found {len(r.data) - r.pos} "
                           "trailing bytes")
    actual = zlib.crc32(r.data[_PREFIX.size:])
    if actual != crc:
        raise CorruptEntry(f"checksum mismatch: expected crc32 {crc:#010x} (stored), found {actual:#010x}")
    try:
        text = version.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptEntry(f"model_version: expected utf-8, found {exc.reason} at byte {exc.start}") from None
    return _normalized(CacheEntry(text, last_ts, page, exposed, last_page, lists), CorruptEntry)


# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------

# Deletes each lock in KEYS that still holds the caller's token (ARGV[1]): a request whose lock
# expired and was taken by a newer request of the same user must not release the newer one's lock.
_RELEASE_LUA = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    n = n + redis.call('DEL', key)
  end
end
return n
"""

# Per user, KEYS holds (lock key, entry key); ARGV[1] is the batch's token, ARGV[2] the lock's
# lifetime in ms. Takes each free lock and reads the entry under it: per user the entry (a hit),
# 0 (locked, no entry) or -1 (the lock is someone else's: busy). A user twice in one batch is
# busy the second time.
_CLAIM_LUA = """
local out = {}
for i = 1, #KEYS, 2 do
  if redis.call('SET', KEYS[i], ARGV[1], 'NX', 'PX', ARGV[2]) then
    out[#out + 1] = redis.call('GET', KEYS[i + 1]) or 0
  else
    out[#out + 1] = -1
  end
end
return out
"""

# KEYS: the n entry keys to write (ARGV[3 + i]: the payload, empty = delete), then the lock keys
# to release if they still hold the token ARGV[1]; ARGV[2]: the entries' TTL in ms, ARGV[3]: n.
_COMMIT_LUA = """
local n = tonumber(ARGV[3])
for i = 1, n do
  local data = ARGV[3 + i]
  if data == '' then
    redis.call('DEL', KEYS[i])
  else
    redis.call('SET', KEYS[i], data, 'PX', ARGV[2])
  end
end
for i = n + 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
  end
end
return n
"""

# Per user, KEYS holds (lock key, entry key) and ARGV[1 + k] the k-th payload (empty = delete);
# ARGV[1] is the TTL in ms. Stores each entry unless the user's lock is held (a request of that
# user is being served and will write its own entry). Returns how many were stored.
_STORE_IF_UNLOCKED_LUA = """
local n = 0
for i = 1, #KEYS, 2 do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    local data = ARGV[1 + (i + 1) / 2]
    if data == '' then
      redis.call('DEL', KEYS[i + 1])
    else
      redis.call('SET', KEYS[i + 1], data, 'PX', ARGV[1])
    end
    n = n + 1
  end
end
return n
"""

_COUNTERS = ("hits", "misses", "busy", "corrupt", "errors", "write_errors", "writes", "circuit_opens")
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


def _payloads(writes: Mapping[int, CacheEntry | None]) -> tuple[dict[int, bytes], int]:
    """The encoded entries of a write-back (b"" = delete the key) and how many were invalid:
    an entry that cannot be encoded is logged and its key deleted (the old entry no longer
    matches what was served)."""
    payloads, invalid = {}, 0
    for uid, entry in writes.items():
        uid = int(uid)
        try:
            payloads[uid] = b"" if entry is None else encode_entry(entry)
        except ValueError as exc:
            LOG.error("user %d: not caching an invalid entry (%s); deleting the cached one", uid, exc)
            payloads[uid], invalid = b"", invalid + 1
    return payloads, invalid


class RedisStageCache:
    """The per-user stage cache of one router model instance (thread-safe).

    Never raises on Redis trouble: claims answer ``"error"`` and commits ``False``. After a
    failure the circuit opens for ``retry_after_s`` (calls answer at once, without the network);
    the first call after that tries Redis again, so the cache recovers by itself.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *, ttl_s: float = 900.0, lock_ms: int = 2000,
                 timeout_s: float = 0.05, retry_after_s: float = 1.0, prefix: str = "comrecycle:",
                 password: str | None = None):
        """``url``: ``redis://`` or ``rediss://`` (TLS), optionally ``user:password@``; ``password``
        overrides the URL's. ``timeout_s`` bounds connecting and every reply."""
        if not ttl_s > 0 or not lock_ms > 0 or not timeout_s > 0 or not retry_after_s >= 0:
            raise ValueError(f"expected ttl_s > 0, lock_ms > 0, timeout_s > 0, retry_after_s >= 0; found "
                             f"{ttl_s}, {lock_ms}, {timeout_s}, {retry_after_s}")
        if password is not None:
            url = _with_password(url, password)
        self.url = redact_url(url)
        self.ttl_s, self.lock_ms, self.timeout_s = float(ttl_s), int(lock_ms), float(timeout_s)
        self.retry_after_s, self.prefix = float(retry_after_s), prefix
        self._ttl_ms = max(1, round(self.ttl_s * 1000))  # PX, not EX: fractional TTLs (tests) work
        # No retries: redis-py's default (3 with backoff) would multiply the timeout; the
        # circuit breaker is the retry policy.
        self._client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry_on_timeout=False,
            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._release_script = self._client.register_script(_RELEASE_LUA)
        self._claim_script = self._client.register_script(_CLAIM_LUA)
        self._commit_script = self._client.register_script(_COMMIT_LUA)
        self._store_script = self._client.register_script(_STORE_IF_UNLOCKED_LUA)
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

    def _lock_and_entry_keys(self, uids) -> list[str]:
        """[lock 1, entry 1, lock 2, entry 2, ...]: the KEYS of the claim and store scripts."""
        return [k for uid in uids for k in (self.lock_key(uid), self.entry_key(uid))]

    # -- the two round trips of a batch -----------------------------------------------------
    def claim(self, user_ids: Sequence[int], token: str) -> list[Claim]:
        """Lock and read the users' entries in one script call: a :class:`Claim` per user, in order.

        A duplicate user in the batch is "busy" after its first occurrence (its lock is taken).
        "hit"/"miss"/"corrupt" claims hold the lock until commit/release (or ``lock_ms``). After a
        timeout Redis may still run the batch, so "error" users can stay locked ("busy") for up
        to ``lock_ms``: harmless, a busy user is served by the full cascade."""
        uids = [int(u) for u in user_ids]
        if not uids:
            return []
        if self._circuit_open():
            return self._errors(len(uids))
        try:
            keys = self._lock_and_entry_keys(uids)
            replies = self._claim_script(keys=keys, args=[token, self.lock_ms])
        except Exception as exc:  # whatever breaks talking to Redis must not fail the batch
            self._failed("claim", exc)
            return self._errors(len(uids))
        self._recovered()
        claims = []
        for uid, raw in zip(uids, replies):
            if raw == -1:
                claims.append(Claim("busy"))
            elif raw == 0:
                claims.append(Claim("miss"))
            else:
                try:
                    claims.append(Claim("hit", decode_entry(raw)))
                except CorruptEntry as exc:
                    LOG.warning("user %d: cached entry under %s is corrupt (%s); treated as a miss",
                                uid, self.entry_key(uid), exc)
                    claims.append(Claim("corrupt"))
        self._count_claims(claims)
        return claims

    def commit(self, writes: Mapping[int, CacheEntry | None], token: str, release: Sequence[int] = ()) -> bool:
        """Store (``None``: delete) the users' entries and release their locks held by ``token``,
        plus those of ``release``, in one script call. True when every write was stored.

        An entry that cannot be encoded is logged and its key deleted (the old entry no longer
        matches what was served)."""
        payloads, invalid = _payloads(writes)
        unlock = list(dict.fromkeys([*payloads, *(int(u) for u in release)]))
        if not unlock:
            return True
        if self._circuit_open():
            self._add(write_errors=len(payloads))
            return False
        try:
            keys = [self.entry_key(u) for u in payloads] + [self.lock_key(u) for u in unlock]
            self._commit_script(keys=keys, args=[token, self._ttl_ms, len(payloads), *payloads.values()])
        except Exception as exc:  # see claim()
            self._failed("commit", exc)
            self._add(write_errors=len(payloads))
            return False
        self._recovered()
        self._add(writes=len(payloads) - invalid, write_errors=invalid)
        return invalid == 0

    def store_if_unlocked(self, writes: Mapping[int, CacheEntry]) -> int | None:
        """Store the entries of users whose lock is free, without taking it (one script call,
        atomic per user): the fresh entries of new sessions, which read nothing from the cache.
        A user whose lock is held is skipped; the request holding it writes its own entry.
        Returns how many were stored (an invalid entry counts, its key deleted), None when
        Redis failed."""
        payloads, _ = _payloads(writes)
        if not payloads:
            return 0
        if self._circuit_open():
            self._add(write_errors=len(payloads))
            return None
        keys = self._lock_and_entry_keys(payloads)
        try:
            stored = int(self._store_script(keys=keys, args=[self._ttl_ms, *payloads.values()]))
        except Exception as exc:  # see claim()
            self._failed("store", exc)
            self._add(write_errors=len(payloads))
            return None
        self._recovered()
        self._add(writes=stored)
        return stored

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
            for script in (self._claim_script, self._commit_script, self._store_script, self._release_script):
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


class MemoryStageCache:
    """The claim/commit/release surface of RedisStageCache over a dict, for in-process routers
    (reference runs, unit tests). Entries are stored encoded, so the codec is on the path;
    `down = True` makes it answer like an unreachable Redis."""

    def __init__(self):
        self.data: dict[int, bytes] = {}
        self.locks: dict[int, str] = {}
        self.down = False

    def claim(self, user_ids: Sequence[int], token: str) -> list[Claim]:
        if self.down:
            return [Claim("error", None) for _ in user_ids]
        out = []
        for u in user_ids:
            if u in self.locks:
                out.append(Claim("busy", None))
                continue
            self.locks[u] = token
            raw = self.data.get(u)
            if raw is None:
                out.append(Claim("miss", None))
                continue
            try:
                out.append(Claim("hit", decode_entry(raw)))
            except CorruptEntry:
                out.append(Claim("corrupt", None))
        return out

    def commit(self, writes: Mapping[int, CacheEntry | None], token: str, release: Sequence[int] = ()) -> bool:
        if self.down:
            return False
        for u, e in writes.items():
            if e is None:
                self.data.pop(u, None)
            else:
                self.data[u] = encode_entry(e)
        self.release(list(writes) + list(release), token)
        return True

    def store_if_unlocked(self, writes: Mapping[int, CacheEntry]) -> int | None:
        if self.down:
            return None
        stored = 0
        for u, e in writes.items():
            if u not in self.locks:
                self.data[u] = encode_entry(e)
                stored += 1
        return stored

    def release(self, user_ids: Sequence[int], token: str) -> None:
        for u in user_ids:
            if self.locks.get(u) == token:
                del self.locks[u]

    def entry(self, uid: int) -> CacheEntry:
        return decode_entry(self.data[uid])
