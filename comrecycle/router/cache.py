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
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Mapping, Sequence

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..specs import EXCLUDE_MAX, PAGE_SIZE, STAGES
from ..errors import ComRecycleError, UserError

LOG = logging.getLogger("comrecycle.router.cache")

CACHED_STAGES = STAGES[:-1]  # ("retrieval", "prerank", "rank"): the page itself is not cached
CLAIM_STATUSES = ("hit", "miss", "busy", "corrupt", "error")
# The entry's `last_page` holds the items of the pages served since the last page whose feedback
# arrived (newest first; one page when the client sends feedback page by page), held back from
# recycled pages meanwhile: up to this many pages (a burst of that many requests of one user).
RECENT_PAGES = 8
# A full entry is ~30 KB (lists of 1000 + 300 + 100 ids, 2000 exposed); anything far larger under a
# user's key is not ours and would slow every claim of the batch it is read in.
ENTRY_MAX_BYTES = 256 * 1024

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
    "CACHED_STAGES", "CLAIM_STATUSES", "CacheEntry", "Claim", "CommitResult", "CorruptEntry", "RedisStageCache",
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
    last_page      int64 [<= RECENT_PAGES·PAGE_SIZE]  items of the pages served since the last page whose
                                          feedback arrived, newest first (usually just the last page)
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


_NO_IDS = np.zeros(0, np.int64)


@dataclass(frozen=True)
class Claim:
    """The answer of :meth:`RedisStageCache.claim` for one user.

    status    "hit" | "miss" | "corrupt": the caller holds the user's lock and must commit or release it;
              "busy": another in-flight request holds it; "error": Redis could not be used.
    entry     "hit": the decoded entry; "busy": the entry as it stands, read without the lock (what
              the user has been shown: for exclusions only), or None
    pending   viewed items parked by requests that found the lock held: taken over (and deleted
              in Redis) by a holding claim, which must apply them; for "busy", what is parked so far
    repaired  "wrong_type" | "oversize" when the user's key held something that is not an entry of
              ours and was deleted, else None
    """

    status: str
    entry: CacheEntry | None = None
    pending: np.ndarray = field(default_factory=lambda: _NO_IDS)
    repaired: str | None = None
    stamp: bytes = b""  # the first 8 bytes (magic + crc) of the value read, b"" if none: commit's check
    parked_len: int = 0  # bytes of the parked key after the claim: what the write-back trims

    @property
    def held(self) -> bool:
        return self.status in ("hit", "miss", "corrupt")


@dataclass(frozen=True)
class CommitResult:
    """What :meth:`RedisStageCache.commit` did: ``stored`` entries written, ``lost`` writes skipped
    because the batch no longer held the user's lock (another request had it), ``ok`` False when
    Redis failed or an entry could not be encoded. Truthy when ok."""

    ok: bool
    stored: int = 0
    lost: int = 0

    def __bool__(self) -> bool:
        return self.ok


class CorruptEntry(ComRecycleError, ValueError):
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
                      _ids("last_page", entry.last_page, RECENT_PAGES * PAGE_SIZE, err), lists)


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
    last_page = r.ids("last_page", n_last, RECENT_PAGES * PAGE_SIZE)
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

# Per user, KEYS holds (lock key, entry key, parked-feedback key). ARGV[1]: the batch's token,
# ARGV[2]: the lock's lifetime (ms), ARGV[3]: the largest entry kept (bytes), ARGV[4]: the parked
# feedback's lifetime (ms), ARGV[5]: its cap (bytes); then per user k: ARGV[4 + 2k] the mode
# ('n': a new session, which reads nothing; 'o': an ongoing one) and ARGV[5 + 2k] the viewed items
# it reports (packed int64). First a key that is not one of our entries (another Redis type,
# oversize) is deleted. Then the lock: taken -> {1, entry, parked feedback (taken over), repaired,
# parked length}: the claim's own viewed items are appended to the parked key, which keeps all it
# took over until the write-back trims that prefix (so requests that find the lock held before the
# write-back know them); held by someone else -> the viewed items are parked and
# {0, entry, parked, repaired, 0} is returned for exclusions. A user twice in one batch is busy the
# second time.
_CLAIM_LUA = """
local out = {}
local max_bytes, cap = tonumber(ARGV[3]), tonumber(ARGV[5])
for i = 1, #KEYS, 3 do
  local k = (i + 2) / 3
  local mode, viewed = ARGV[4 + 2 * k], ARGV[5 + 2 * k]
  local lock, entry, parked = KEYS[i], KEYS[i + 1], KEYS[i + 2]
  local repaired = 0
  local t = redis.call('TYPE', entry)['ok']
  if t ~= 'none' and t ~= 'string' then
    redis.call('DEL', entry)
    repaired = 1
  elseif t == 'string' and redis.call('STRLEN', entry) > max_bytes then
    redis.call('DEL', entry)
    repaired = 2
  end
  local pt = redis.call('TYPE', parked)['ok']
  if pt ~= 'none' and pt ~= 'string' then
    redis.call('DEL', parked)
  end
  if redis.call('SET', lock, ARGV[1], 'NX', 'PX', ARGV[2]) then
    if mode == 'n' then
      redis.call('DEL', parked)
      out[#out + 1] = {1, false, false, repaired, 0}
    else
      local p = redis.call('GET', parked)
      if #viewed > 0 then
        redis.call('APPEND', parked, viewed)
        redis.call('PEXPIRE', parked, ARGV[4])
      end
      out[#out + 1] = {1, redis.call('GET', entry), p, repaired, redis.call('STRLEN', parked)}
    end
  elseif mode == 'n' then
    out[#out + 1] = {0, false, false, repaired, 0}
  else
    if #viewed > 0 then
      redis.call('APPEND', parked, viewed)
      local n = redis.call('STRLEN', parked)
      if n > cap then
        redis.call('SET', parked, redis.call('GETRANGE', parked, n - cap, n - 1))
      end
      redis.call('PEXPIRE', parked, ARGV[4])
    end
    out[#out + 1] = {0, redis.call('GET', entry), redis.call('GET', parked), repaired, 0}
  end
end
return out
"""

# KEYS: per write (entry key, lock key, parked key), then the lock keys to release only. ARGV[1]:
# the batch's token, ARGV[2]: the entries' TTL (ms), ARGV[3]: n, the number of writes, ARGV[3 + i]:
# the i-th payload (empty = delete), ARGV[3 + n + i]: the first 8 bytes (magic + crc) of the entry
# the batch read ('' = none, '-' = not given), ARGV[3 + 2n + i]: the parked length the claim saw
# (that prefix is now in the entry: trimmed after the write). An entry is written while its lock holds the token, or,
# when the lock is gone (expired, evicted under maxmemory) and nobody else holds it, if the entry
# is still the one the batch read: a batch that lost the race to another request of the user must
# not overwrite that request's state. Returns {written, lost}.
_COMMIT_LUA = """
local n = tonumber(ARGV[3])
local written, lost = 0, 0
for i = 1, n do
  local entry, lock, parked = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local holder = redis.call('GET', lock)
  local ours = holder == ARGV[1]
  if not holder then
    local expect = ARGV[3 + n + i]
    ours = expect ~= '-' and redis.call('GETRANGE', entry, 0, 7) == expect
  end
  if ours then
    local data = ARGV[3 + i]
    if data == '' then
      redis.call('DEL', entry)
    else
      redis.call('SET', entry, data, 'PX', ARGV[2])
    end
    local applied = tonumber(ARGV[3 + 2 * n + i])
    if applied > 0 and redis.call('TYPE', parked)['ok'] == 'string' then
      local len = redis.call('STRLEN', parked)
      if len <= applied then
        redis.call('DEL', parked)
      else
        redis.call('SET', parked, redis.call('GETRANGE', parked, applied, len - 1), 'KEEPTTL')
      end
    end
    redis.call('DEL', lock)
    written = written + 1
  else
    lost = lost + 1
  end
end
for i = 3 * n + 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then
    redis.call('DEL', KEYS[i])
  end
end
return {written, lost}
"""

# Extends each lock in KEYS that still holds the token ARGV[1] to ARGV[2] ms; returns how many.
_EXTEND_LUA = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    n = n + redis.call('PEXPIRE', key, ARGV[2])
  end
end
return n
"""

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
        return _NO_IDS
    raw = bytes(raw)
    ids = np.frombuffer(raw[:len(raw) - len(raw) % _ID.itemsize], _ID).astype(np.int64)
    return ids[ids >= 0]


def _payloads(writes: Mapping[int, CacheEntry | None]) -> tuple[dict[int, bytes], set[int]]:
    """The encoded entries of a write-back (b"" = delete the key) and the users whose entry was
    invalid: an entry that cannot be encoded is logged and its key deleted (the old entry no
    longer matches what was served); the feedback parked for that user is kept."""
    payloads, invalid = {}, set()
    for uid, entry in writes.items():
        uid = int(uid)
        try:
            payloads[uid] = b"" if entry is None else encode_entry(entry)
        except ValueError as exc:
            LOG.error("user %d: not caching an invalid entry (%s); deleting the cached one", uid, exc)
            payloads[uid] = b""
            invalid.add(uid)
    return payloads, invalid


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
        self._release_script = self._client.register_script(_RELEASE_LUA)
        self._claim_script = self._client.register_script(_CLAIM_LUA)
        self._commit_script = self._client.register_script(_COMMIT_LUA)
        self._extend_script = self._client.register_script(_EXTEND_LUA)
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
        viewed = [_NO_IDS] * len(uids) if viewed is None else viewed
        modes = ["o"] * len(uids) if new_session is None else ["n" if n else "o" for n in new_session]
        try:
            keys = [k for uid in uids for k in (self.lock_key(uid), self.entry_key(uid), self.parked_key(uid))]
            args = [token, self.lock_ms, self.max_entry_bytes, self._ttl_ms, EXCLUDE_MAX * _ID.itemsize]
            for mode, v in zip(modes, viewed):
                args += [mode, np.asarray(v, _ID).tobytes()]
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
        return Claim(status, entry, pending, repaired, bytes(raw[:_PREFIX.size]) if raw else b"", int(parked_len))

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
        payloads, invalid = _payloads(writes)
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
        items = {int(u): np.asarray(v, _ID) for u, v in viewed.items() if len(v)}
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


class MemoryStageCache:
    """The claim/commit/extend/release surface of RedisStageCache over a dict, for in-process
    routers (reference runs, unit tests), with the same rules (locks, parked feedback, writes only
    under the lock). Entries are stored encoded, so the codec is on the path; `down = True` makes
    it answer like an unreachable Redis."""

    def __init__(self):
        self.data: dict[int, bytes] = {}
        self.locks: dict[int, str] = {}
        self.parked: dict[int, np.ndarray] = {}
        self.down = False

    def claim(self, user_ids: Sequence[int], token: str, viewed: Sequence[np.ndarray] | None = None,
              new_session: Sequence[bool] | None = None) -> list[Claim]:
        if self.down:
            return [Claim("error") for _ in user_ids]
        out = []
        for k, u in enumerate(user_ids):
            u = int(u)
            new = bool(new_session[k]) if new_session is not None else False
            raw = self.data.get(u)
            if u in self.locks:
                if new:
                    out.append(Claim("busy"))
                    continue
                v = np.asarray(viewed[k], np.int64) if viewed is not None else _NO_IDS
                if v.size:
                    self.parked[u] = np.concatenate([self.parked.get(u, _NO_IDS), v])[-EXCLUDE_MAX:]
                out.append(Claim("busy", self._decoded(raw), self.parked.get(u, _NO_IDS)))
                continue
            self.locks[u] = token
            if new:
                self.parked.pop(u, None)
                out.append(Claim("miss"))
                continue
            pending = self.parked.get(u, _NO_IDS)
            v = np.asarray(viewed[k], np.int64) if viewed is not None else _NO_IDS
            if v.size:  # known to busy requests until the write-back trims what this claim applied
                self.parked[u] = np.concatenate([pending, v])
            n_parked = int(self.parked.get(u, _NO_IDS).size) * _ID.itemsize
            if raw is None:
                out.append(Claim("miss", None, pending, None, b"", n_parked))
                continue
            entry, stamp = self._decoded(raw), raw[:_PREFIX.size]
            out.append(Claim("corrupt", None, pending, None, stamp, n_parked) if entry is None
                       else Claim("hit", entry, pending, None, stamp, n_parked))
        return out

    @staticmethod
    def _decoded(raw: bytes | None) -> CacheEntry | None:
        if raw is None:
            return None
        try:
            return decode_entry(raw)
        except CorruptEntry:
            return None

    def commit(self, writes: Mapping[int, CacheEntry | None], token: str, release: Sequence[int] = (),
               stamps: Mapping[int, bytes] | None = None, parked_lens: Mapping[int, int] | None = None) -> CommitResult:
        if self.down:
            return CommitResult(False)
        stored = lost = 0
        payloads, invalid = _payloads(writes)
        for u, e in writes.items():
            u = int(u)
            holder = self.locks.get(u)
            unchanged = (holder is None and stamps is not None and u in stamps
                         and self.data.get(u, b"")[:_PREFIX.size] == stamps[u])
            if holder != token and not unchanged:
                lost += 1
                continue
            if payloads[u] == b"":
                self.data.pop(u, None)
            else:
                self.data[u] = payloads[u]
            stored += 1
            applied = 0 if u in invalid else int((parked_lens or {}).get(u, 0)) // _ID.itemsize
            if applied and u in self.parked:
                rest = self.parked[u][applied:]
                if rest.size:
                    self.parked[u] = rest
                else:
                    del self.parked[u]
        self.release(list(writes) + list(release), token)
        return CommitResult(not invalid, stored, lost)

    def park(self, viewed: Mapping[int, np.ndarray]) -> bool:
        if self.down:
            return False
        for u, v in viewed.items():
            if len(v):
                self.parked[int(u)] = np.concatenate([self.parked.get(int(u), _NO_IDS), np.asarray(v, np.int64)])
        return True

    def extend(self, user_ids: Sequence[int], token: str) -> int:
        return 0 if self.down else sum(self.locks.get(int(u)) == token for u in dict.fromkeys(user_ids))

    def release(self, user_ids: Sequence[int], token: str) -> None:
        for u in user_ids:
            if self.locks.get(u) == token:
                del self.locks[u]

    def entry(self, uid: int) -> CacheEntry:
        return decode_entry(self.data[uid])
