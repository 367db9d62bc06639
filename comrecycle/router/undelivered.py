"""Feedback kept through a Redis outage: the viewed items that requests reported while the cache
could not be reached, bounded, parked in Redis once it answers again (by the next batch that
reaches it or by a background retry, whichever comes first), so that no feedback is lost."""
from __future__ import annotations

import logging
import threading
import time

import numpy as np

from ..specs import EXCLUDE_MAX
from .batch import BatchReport, RouterRequest

log = logging.getLogger("comrecycle.router")
UNDELIVERED_USERS_MAX = 100_000  # users whose feedback a router keeps while Redis is unavailable


class UndeliveredFeedback:
    def __init__(self, cache):
        self.cache = cache
        self.kept: dict[int, np.ndarray] = {}  # user id -> viewed items, oldest first
        self._lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self.retry_s = float(getattr(cache, "retry_after_s", 1.0)) or 1.0

    def take(self, user_id: int) -> np.ndarray | None:
        """The items kept for a user (removed: they go with the user's request)."""
        with self._lock:
            return self.kept.pop(user_id, None) if self.kept else None

    def after_claim(self, reqs: list[RouterRequest], claims, report: BatchReport) -> None:
        """Redis failed for the batch: keep the viewed items its requests reported (bounded); Redis
        answered: park what earlier batches kept."""
        if any(c.status == "error" for c in claims):
            with self._lock:
                for r, c in zip(reqs, claims):
                    ids = np.concatenate([r.undelivered, r.viewed])
                    if c.status != "error" or not ids.size or r.new_session:
                        continue
                    if len(self.kept) >= UNDELIVERED_USERS_MAX and r.user_id not in self.kept:
                        self.kept.pop(next(iter(self.kept)))  # the oldest goes first
                        report.feedback_dropped += 1
                    old = self.kept.get(r.user_id, np.zeros(0, np.int64))
                    self.kept[r.user_id] = np.concatenate([old, ids])[-EXCLUDE_MAX:]
                if self.kept and (self._flusher is None or not self._flusher.is_alive()):
                    self._flusher = threading.Thread(target=self._flush_loop, name="comrecycle-feedback",
                                                     daemon=True)
                    self._flusher.start()
        elif self.kept:
            self.flush()

    def flush(self) -> bool:
        """Park the kept feedback in Redis; True when nothing is left to deliver."""
        with self._lock:
            kept, self.kept = self.kept, {}
        if not kept:
            return True
        if self.cache.park(kept):
            log.info("Redis answers again: parked the feedback of %d users kept during the outage", len(kept))
            return True
        with self._lock:  # put back, under what arrived meanwhile
            for u, ids in kept.items():
                self.kept[u] = np.concatenate([ids, self.kept.get(u, np.zeros(0, np.int64))])[-EXCLUDE_MAX:]
        return False

    def _flush_loop(self) -> None:
        while True:
            time.sleep(self.retry_s)
            if self.flush():
                return
