"""Overlapping a router instance's batches: its own event loop, a bound on batches in flight.

A non-decoupled Python model is held by Triton until `execute` returns, so with a blocking
`execute` a router instance serves one batch at a time: a batch whose requests wait ~15 ms on a
full cascade keeps the instance from the next batch, whose requests might be recycled in 3 ms.
Since Triton 24.07 a non-decoupled model may answer its requests through their response senders
after `execute` has returned (server PR #7311 tests exactly that), so `execute` can hand the
batch to this runner and return: the instance takes the next batch while the first one's BLS
calls are out, as an async decoupled model would, and clients keep the plain unary contract.

The bound keeps Triton's scheduler in charge of the queue: `submit` blocks while
`max_inflight` batches of this instance are unanswered, so an overload queues (and times out,
with Triton's queue policy) in Triton rather than piling up inside the model.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Coroutine
from ..errors import UserError

log = logging.getLogger("comrecycle.router")


class BatchRunner:
    """Runs coroutines (one per batch) on a dedicated event-loop thread, at most
    `max_inflight` at once. BLS `async_exec` runs each call in the loop's default executor,
    so that executor gets enough threads for every call the batches in flight can issue."""

    def __init__(self, max_inflight: int, calls_per_batch: int = 4, name: str = "comrecycle-router"):
        if int(max_inflight) < 1:
            raise UserError(f"max_inflight: expected an integer >= 1, got {max_inflight!r}")
        self.max_inflight = int(max_inflight)
        self._slots = threading.BoundedSemaphore(self.max_inflight)
        self._loop = asyncio.new_event_loop()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(4, self.max_inflight * calls_per_batch), thread_name_prefix=f"{name}-call")
        self._loop.set_default_executor(self._executor)
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{name}-loop", daemon=True)
        self._thread.start()
        self._closed = False

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        """Schedule `coro` (which must answer its requests itself and should not raise); blocks
        while `max_inflight` earlier ones are unfinished. An exception it raises anyway is logged."""
        if self._closed:
            coro.close()
            raise RuntimeError("BatchRunner.submit after close()")
        self._slots.acquire()
        try:
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(self._finished)
        return future

    def _finished(self, future: concurrent.futures.Future) -> None:
        self._slots.release()
        if not future.cancelled() and future.exception() is not None:
            log.error("a router batch raised", exc_info=future.exception())

    @property
    def inflight(self) -> int:
        return self.max_inflight - self._slots._value  # noqa: SLF001 - for tests and logs only

    def drain(self, timeout_s: float = 30.0) -> bool:
        """Wait until no batch is in flight (True) or `timeout_s` passed (False)."""
        taken, deadline = 0, time.monotonic() + timeout_s
        try:
            while taken < self.max_inflight:
                left = deadline - time.monotonic()
                if left <= 0 or not self._slots.acquire(timeout=left):
                    break
                taken += 1
        finally:
            for _ in range(taken):
                self._slots.release()
        return taken == self.max_inflight

    def close(self, timeout_s: float = 30.0) -> None:
        """Let the batches in flight finish (up to `timeout_s`), then stop the loop."""
        if self._closed:
            return
        self._closed = True
        if not self.drain(timeout_s):
            log.warning("router batches still in flight after %.0f s at shutdown", timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._executor.shutdown(wait=False)
