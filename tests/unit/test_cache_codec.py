"""The router cache's binary codec: exact round trips, compact size, and CorruptEntry (never a
crash or a wrong entry) for any damaged bytes. No Redis needed."""
import struct
import zlib

import numpy as np
import pytest

from comrecycle.router.entry import (CACHED_STAGES, RECENT_PAGES, CacheEntry, CorruptEntry, StageList, decode_entry,
                                     encode_entry)
from comrecycle.specs import EXCLUDE_MAX, PAGE_SIZE


def _entry(n_ret=1000, n_pre=300, n_rank=100, n_exposed=40, version="v1-abc") -> CacheEntry:
    rng = np.random.default_rng(0)
    lists = {}
    for stage, n in zip(CACHED_STAGES, (n_ret, n_pre, n_rank)):
        if n is not None:
            lists[stage] = StageList(rng.choice(10**9, n, replace=False).astype(np.int64), 1.7e9 + 0.25, 2)
    return CacheEntry(version, 1.7e9 + 3.5, 3, np.arange(n_exposed, dtype=np.int64) * 7 + 2**40,
                      np.arange(PAGE_SIZE, dtype=np.int64), lists)


def _small() -> CacheEntry:
    return CacheEntry("vé", 12.5, 1, np.array([5, 6]), np.array([7]),
                      {"retrieval": StageList(np.array([1, 2, 3]), 10.0, 1), "rank": StageList(np.array([9]), 11.0, 0)})


def _reseal(data: bytes) -> bytes:
    """``data`` with a correct checksum: reaches the value checks behind the crc."""
    return data[:4] + struct.pack("<I", zlib.crc32(data[8:])) + data[8:]


@pytest.mark.parametrize("entry", [
    _entry(),
    _entry(n_ret=None, n_pre=None, n_rank=None, n_exposed=0),  # no lists, nothing exposed
    _entry(n_ret=0, n_pre=0, n_rank=0),  # used-up lists
    _entry(n_pre=None, version="modèle-ß-✓-" + "x" * 200),
    _entry(n_exposed=EXCLUDE_MAX, version=""),
    _small(),
], ids=["full", "empty", "empty-lists", "unicode-version", "max-exposed", "small"])
def test_round_trip_is_exact(entry):
    data = encode_entry(entry)
    back = decode_entry(data)
    assert back == entry
    assert back.model_version == entry.model_version and back.last_ts == entry.last_ts
    assert list(back.lists) == [s for s in CACHED_STAGES if s in entry.lists]
    for arr in [back.exposed, back.last_page, *(lst.items for lst in back.lists.values())]:
        assert arr.dtype == np.int64 and arr.flags.writeable
    assert encode_entry(back) == data  # canonical


def test_lists_and_python_ints_are_accepted_and_order_is_canonical():
    e = CacheEntry("v", 1, 0, [1, 2], np.array([], dtype=np.float64),
                   {"rank": StageList([3], 2, 1), "retrieval": StageList(np.array([4], np.uint32), 1.5, 1)})
    back = decode_entry(encode_entry(e))
    assert list(back.lists) == ["retrieval", "rank"] and back.last_page.size == 0
    assert back.exposed.tolist() == [1, 2] and back.lists["retrieval"].items.tolist() == [4]


def test_size_is_compact():
    e = _entry(n_exposed=0)
    assert len(encode_entry(e)) < 12_000  # 1400 ids x 8 bytes + ~250 bytes of headers
    assert len(encode_entry(_entry(n_ret=None, n_pre=None, n_rank=None, n_exposed=0))) < 250


def test_truncation_at_every_offset_is_corrupt():
    data = encode_entry(_small())
    for n in range(len(data)):
        with pytest.raises(CorruptEntry):
            decode_entry(data[:n])


def test_every_single_byte_flip_is_corrupt():
    data = encode_entry(_small())
    for i in range(len(data)):
        for mask in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[i] ^= mask
            with pytest.raises(CorruptEntry):
                decode_entry(bytes(bad))


def test_trailing_bytes_wrong_magic_and_checksum_are_named():
    data = encode_entry(_small())
    with pytest.raises(CorruptEntry, match="trailing"):
        decode_entry(data + b"\0")
    with pytest.raises(CorruptEntry, match="magic"):
        decode_entry(b"XXXX" + data[4:])
    with pytest.raises(CorruptEntry, match="checksum"):
        decode_entry(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CorruptEntry, match="truncated"):
        decode_entry(b"")
    with pytest.raises(CorruptEntry, match="expected bytes"):
        decode_entry("not bytes")  # type: ignore[arg-type]
    with pytest.raises(CorruptEntry):
        decode_entry(b"\x80\x04\x95pickle-like garbage")


def _patched(entry: CacheEntry, offset: int, fmt: str, value) -> bytes:
    data = bytearray(encode_entry(entry))
    struct.pack_into(fmt, data, offset, value)
    return _reseal(bytes(data))


# offsets in _small()'s encoding: prefix 8 | header 20 (last_ts 8, page 4, n_exposed 4, n_last 2,
# version_len 1, n_lists 1) | version 3 | exposed 16 | last_page 8 | list 0 header 17 (code 1, ts 8,
# pages 4, n_items 4) | items 24 | list 1 header ...
_HDR, _LISTS = 8, 8 + 20 + 3 + 16 + 8


@pytest.mark.parametrize("offset, fmt, value, match", [
    (_HDR, "<d", float("nan"), "last_ts"),
    (_HDR, "<d", float("inf"), "last_ts"),
    (_HDR + 8, "<i", -1, "page"),
    (_HDR + 12, "<I", EXCLUDE_MAX + 1, "exposed"),
    (_HDR + 16, "<H", RECENT_PAGES * PAGE_SIZE + 1, "last_page"),
    (_HDR + 19, "<B", 4, "stage lists"),
    (_HDR + 20 + 3, "<q", -1, "exposed"),  # a negative id
    (_LISTS, "<B", 7, "stage code"),
    (_LISTS, "<B", 2, "increasing order"),  # rank, then rank again
    (_LISTS + 1, "<d", float("-inf"), "ts"),
    (_LISTS + 9, "<i", -3, "pages"),
    (_LISTS + 13, "<I", 2**31, "at most"),
    (_LISTS + 17, "<q", -5, ">= 0"),
])
def test_bad_values_behind_a_valid_checksum_are_corrupt(offset, fmt, value, match):
    with pytest.raises(CorruptEntry, match=match):
        decode_entry(_patched(_small(), offset, fmt, value))


def test_invalid_utf8_version_is_corrupt():
    data = bytearray(encode_entry(_small()))
    data[_HDR + 20] = 0xFF
    with pytest.raises(CorruptEntry, match="utf-8"):
        decode_entry(_reseal(bytes(data)))


def _with(**changes) -> CacheEntry:
    e = _small()
    for k, v in changes.items():
        setattr(e, k, v)
    return e


@pytest.mark.parametrize("entry, match", [
    (_with(exposed=np.array([1.5, 2.0])), "int64"),
    (_with(exposed=np.array(["a"])), "int64"),
    (_with(exposed=np.array([2**63], np.uint64)), "fit int64"),
    (_with(exposed=np.arange(EXCLUDE_MAX + 1)), f"at most {EXCLUDE_MAX}"),
    (_with(exposed=np.array([[1, 2]])), "1-D"),
    (_with(last_page=np.arange(RECENT_PAGES * PAGE_SIZE + 1)), "last_page"),
    (_with(last_page=np.array([3, -1])), ">= 0"),
    (_with(model_version="x" * 256), "255"),
    (_with(model_version="\ud800"), "utf-8"),
    (_with(model_version=b"v1"), "str"),
    (_with(last_ts=float("nan")), "last_ts"),
    (_with(last_ts="now"), "last_ts"),
    (_with(page=-1), "page"),
    (_with(page=2.0), "page"),
    (_with(lists={"rerank": StageList(np.array([1]), 0.0, 1)}), "stages among"),
    (_with(lists={"rank": (np.array([1]), 0.0, 1)}), "StageList"),
    (_with(lists={"rank": StageList(np.array([1]), float("inf"), 1)}), "ts"),
    (_with(lists={"rank": StageList(np.array([1]), 0.0, -2)}), "pages"),
    (_with(lists={"rank": StageList(np.array([True]), 0.0, 1)}), "int64"),
])
def test_encode_rejects_invalid_entries(entry, match):
    with pytest.raises(ValueError, match=match):
        encode_entry(entry)
