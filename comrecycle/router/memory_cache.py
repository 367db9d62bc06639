"""MemoryStageCache: the Redis stage cache's surface and rules over a dict (in-process routers)."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..specs import EXCLUDE_MAX

from .entry import (ID_DTYPE, NO_IDS, STAMP, CacheEntry, Claim, CommitResult, CorruptEntry, decode_entry,
                    encode_payloads)


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
                v = np.asarray(viewed[k], np.int64) if viewed is not None else NO_IDS
                if v.size:
                    self.parked[u] = np.concatenate([self.parked.get(u, NO_IDS), v])[-EXCLUDE_MAX:]
                out.append(Claim("busy", self._decoded(raw), self.parked.get(u, NO_IDS)))
                continue
            self.locks[u] = token
            if new:
                self.parked.pop(u, None)
                out.append(Claim("miss"))
                continue
            pending = self.parked.get(u, NO_IDS)
            v = np.asarray(viewed[k], np.int64) if viewed is not None else NO_IDS
            if v.size:  # known to busy requests until the write-back trims what this claim applied
                self.parked[u] = np.concatenate([pending, v])
            n_parked = int(self.parked.get(u, NO_IDS).size) * ID_DTYPE.itemsize
            if raw is None:
                out.append(Claim("miss", None, pending, None, b"", n_parked))
                continue
            entry, stamp = self._decoded(raw), raw[:STAMP.size]
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
        payloads, invalid = encode_payloads(writes)
        for u, e in writes.items():
            u = int(u)
            holder = self.locks.get(u)
            unchanged = (holder is None and stamps is not None and u in stamps
                         and self.data.get(u, b"")[:STAMP.size] == stamps[u])
            if holder != token and not unchanged:
                lost += 1
                continue
            if payloads[u] == b"":
                self.data.pop(u, None)
            else:
                self.data[u] = payloads[u]
            stored += 1
            applied = 0 if u in invalid else int((parked_lens or {}).get(u, 0)) // ID_DTYPE.itemsize
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
                self.parked[int(u)] = np.concatenate([self.parked.get(int(u), NO_IDS), np.asarray(v, np.int64)])
        return True

    def extend(self, user_ids: Sequence[int], token: str) -> int:
        return 0 if self.down else sum(self.locks.get(int(u)) == token for u in dict.fromkeys(user_ids))

    def release(self, user_ids: Sequence[int], token: str) -> None:
        for u in user_ids:
            if self.locks.get(u) == token:
                del self.locks[u]

    def entry(self, uid: int) -> CacheEntry:
        return decode_entry(self.data[uid])
