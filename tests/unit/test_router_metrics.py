"""RouterMetrics: local sums, queued observations, and when they reach Triton (a fake pb_utils)."""
from __future__ import annotations

import time

import numpy as np
import pytest

from comrecycle.router.batch import BatchReport
from comrecycle.router.serving import RouterMetrics


class FakeMetric:
    def __init__(self, family, labels, buckets=None):
        self.family, self.labels, self.calls = family, labels, []

    def increment(self, v):
        self.calls.append(("inc", v))

    def observe(self, v):
        self.calls.append(("obs", v))

    def set(self, v):
        self.calls.append(("set", v))


class FakeFamily:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

    def __init__(self, name, doc, kind):
        self.name = name

    def Metric(self, labels, buckets=None):  # noqa: N802 - pb_utils' name
        return FakeMetric(self.name, labels, buckets)


class FakePbUtils:
    MetricFamily = FakeFamily


def report(strategies=(1, 0, 0, 2), spent=1.1, saved=1.9):
    r = BatchReport(requests=int(sum(strategies)))
    r.strategies = np.array(strategies)
    r.compute_spent, r.compute_saved = spent, saved
    r.cache["hit"], r.cache["miss"] = 2, 1
    r.phase_seconds.update(parse=0.001, stages=0.004)
    return r


def test_batches_are_summed_and_sent_on_flush():
    m = RouterMetrics(FakePbUtils, "recycle_router", "1", flush_s=3600)  # the thread never fires here
    try:
        m.record(report(), [(3, 0.002), (3, 0.003), (0, 0.02)])
        m.record(report(), [(3, 0.004)])
        assert m.requests[3].calls == []  # nothing sent yet
        m.flush()
        assert m.requests[3].calls == [("inc", 4.0)] and m.requests[0].calls == [("inc", 2.0)]
        assert m.requests[1].calls == []  # zero counts are not sent
        assert m.cache["hit"].calls == [("inc", 4.0)]
        assert m.compute["spent"].calls == [("inc", pytest.approx(2.2))]
        assert m.compute["always_full"].calls == [("inc", pytest.approx(6.0))]
        assert m.saved_ratio.calls == [("set", pytest.approx(1 - 2.2 / 6.0))]
        assert [v for _, v in m.latency[3].calls] == [0.002, 0.003, 0.004]  # every observation kept
        assert len(m.phases["parse"].calls) == 2
        m.flush()  # nothing new: nothing sent again
        assert len(m.requests[3].calls) == 1 and len(m.saved_ratio.calls) == 1
    finally:
        m.close()


def test_zero_interval_sends_after_every_batch():
    m = RouterMetrics(FakePbUtils, "recycle_router", "1", flush_s=0)
    m.record(report(), [(3, 0.002)])
    assert m.requests[3].calls == [("inc", 2.0)] and m._thread is None
    m.close()


def test_the_background_thread_flushes_and_close_sends_the_rest():
    m = RouterMetrics(FakePbUtils, "recycle_router", "1", flush_s=0.05)
    m.record(report(), [(3, 0.002)])
    deadline = time.monotonic() + 5
    while not m.requests[3].calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert m.requests[3].calls == [("inc", 2.0)]
    m.flush_s = 3600  # the next batch stays pending until close()
    m.record(report(strategies=(0, 0, 0, 1)), [])
    m.close()
    assert m.requests[3].calls[-1] == ("inc", 1.0) and not m._thread.is_alive()


def test_a_failing_metric_update_is_logged_not_raised(caplog):
    m = RouterMetrics(FakePbUtils, "recycle_router", "1", flush_s=0)

    def boom(v):
        raise RuntimeError("stub is shutting down")

    m.requests[3].increment = boom
    m.record(report(), [])  # must not raise
    assert "could not update the router's metrics" in caplog.text
