"""A user's cache entry (what the router keeps between two pages of a session) and its compact
binary codec, shared by the Redis cache (router.cache), the in-memory cache
(router.memory_cache) and the simulator (sim.recycling.StageCache).

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
import zlib
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Mapping

import numpy as np

from ..specs import EXCLUDE_MAX, PAGE_SIZE, STAGES
from ..errors import ComRecycleError


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
ID_DTYPE = np.dtype("<i8")
STAMP = struct.Struct("<4sI")  # magic, crc32
_HEADER = struct.Struct("<diIHBB")  # last_ts, page, n_exposed, n_last_page, version_len, n_lists
_LIST_HEADER = struct.Struct("<BdiI")  # stage code, ts, pages, n_items




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


NO_IDS = np.zeros(0, np.int64)


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
    pending: np.ndarray = field(default_factory=lambda: NO_IDS)
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
             version, e.exposed.astype(ID_DTYPE, copy=False).tobytes(), e.last_page.astype(ID_DTYPE, copy=False).tobytes()]
    for stage, lst in e.lists.items():
        parts.append(_LIST_HEADER.pack(CACHED_STAGES.index(stage), lst.ts, lst.pages, lst.items.size))
        parts.append(lst.items.astype(ID_DTYPE, copy=False).tobytes())
    body = b"".join(parts)
    return STAMP.pack(MAGIC, zlib.crc32(body)) + body


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
        return np.frombuffer(self.take(count * ID_DTYPE.itemsize, what), ID_DTYPE).astype(np.int64)


def decode_entry(data: bytes) -> CacheEntry:
    """The :class:`CacheEntry` encoded in ``data``; CorruptEntry for anything else (wrong
    magic, truncated, trailing bytes, bad checksum, unknown stage, out-of-range values)."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CorruptEntry(f"expected bytes, found {type(data).__name__}")
    r = _Reader(data)
    magic, crc = r.unpack(STAMP, "the prefix")
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
    actual = zlib.crc32(r.data[STAMP.size:])
    if actual != crc:
        raise CorruptEntry(f"checksum mismatch: expected crc32 {crc:#010x} (stored), found {actual:#010x}")
    try:
        text = version.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptEntry(f"model_version: expected utf-8, found {exc.reason} at byte {exc.start}") from None
    return _normalized(CacheEntry(text, last_ts, page, exposed, last_page, lists), CorruptEntry)


def encode_payloads(writes: Mapping[int, CacheEntry | None]) -> tuple[dict[int, bytes], set[int]]:
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
