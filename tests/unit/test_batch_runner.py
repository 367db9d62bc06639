"""BatchRunner: a router instance's batches overlap, up to a bound, on its own event loop."""
import asyncio
import logging
import threading
import time

import pytest

from comrecycle.router.runner import BatchRunner


def _wait(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.005)
    return False


def test_a_waiting_batch_does_not_hold_the_next_one():
    runner = BatchRunner(2)
    first_may_finish = asyncio.Event()
    order = []

    async def slow():  # waits on its "full cascade" until the second batch is served
        await first_may_finish.wait()
        order.append("slow")

    async def fast():
        order.append("fast")
        first_may_finish.set()

    try:
        a = runner.submit(slow())
        b = runner.submit(fast())
        a.result(timeout=5), b.result(timeout=5)
        assert order == ["fast", "slow"]
    finally:
        runner.close()


def test_one_inflight_batch_serves_them_one_at_a_time():
    runner = BatchRunner(1)
    release = threading.Event()
    order = []

    async def first():
        order.append("first start")
        while not release.is_set():
            await asyncio.sleep(0.005)
        order.append("first end")

    async def second():
        order.append("second")

    try:
        runner.submit(first())
        t = threading.Thread(target=lambda: runner.submit(second()))
        t.start()
        time.sleep(0.1)
        assert t.is_alive(), "submit must block while max_inflight batches are unfinished"
        assert order == ["first start"]
        release.set()
        t.join(timeout=5)
        assert _wait(lambda: order == ["first start", "first end", "second"])
    finally:
        runner.close()


def test_submit_blocks_at_the_bound_and_resumes_when_a_batch_ends():
    runner = BatchRunner(2)
    gates = [threading.Event() for _ in range(3)]

    async def batch(k):
        while not gates[k].is_set():
            await asyncio.sleep(0.005)

    try:
        runner.submit(batch(0)), runner.submit(batch(1))
        assert runner.inflight == 2
        third = threading.Thread(target=lambda: runner.submit(batch(2)))
        third.start()
        time.sleep(0.1)
        assert third.is_alive()
        gates[1].set()
        third.join(timeout=5)
        assert not third.is_alive()
        gates[0].set(), gates[2].set()
        assert runner.drain(5)
        assert runner.inflight == 0
    finally:
        runner.close()


def test_blocking_calls_of_all_inflight_batches_run_at_once():
    # BLS async_exec runs each call in the loop's default executor (run_in_executor(None, ...)):
    # the executor must not cap the calls of the batches in flight (asyncio's default has
    # min(32, cores + 4) threads, 6 on 2 cores)
    n = 8
    runner = BatchRunner(n, calls_per_batch=1)
    barrier = threading.Barrier(n, timeout=5)

    async def batch():
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)

    try:
        futures = [runner.submit(batch()) for _ in range(n)]
        for f in futures:
            f.result(timeout=10)  # BrokenBarrierError if fewer than n threads ran at once
    finally:
        runner.close()


def test_a_raising_batch_is_logged_and_frees_its_slot(caplog):
    runner = BatchRunner(1)

    async def boom():
        raise RuntimeError("batch failed")

    async def ok():
        return 7

    try:
        with caplog.at_level(logging.ERROR, logger="comrecycle.router"):
            f = runner.submit(boom())
            with pytest.raises(RuntimeError):
                f.result(timeout=5)
            assert runner.submit(ok()).result(timeout=5) == 7
        assert _wait(lambda: "a router batch raised" in caplog.text)
    finally:
        runner.close()


def test_close_lets_the_inflight_batches_finish():
    runner = BatchRunner(3)
    done = []

    async def batch(k):
        await asyncio.sleep(0.05 * (k + 1))
        done.append(k)

    for k in range(3):
        runner.submit(batch(k))
    runner.close(timeout_s=5)
    assert sorted(done) == [0, 1, 2]
    with pytest.raises(RuntimeError, match="after close"):
        runner.submit(batch(0))


@pytest.mark.parametrize("bad", [0, -1])
def test_the_bound_must_be_positive(bad):
    with pytest.raises(ValueError, match="expected an integer >= 1"):
        BatchRunner(bad)


def test_the_setting_is_read_as_a_positive_integer():
    from comrecycle.settings import RouterSettings

    assert RouterSettings.resolve({}, env={}).max_inflight_batches == 1  # default: one batch at a time
    assert RouterSettings.resolve({"max_inflight_batches": "2"}, env={}).max_inflight_batches == 2
    env = {"COMRECYCLE_ROUTER_MAX_INFLIGHT_BATCHES": "4"}
    assert RouterSettings.resolve({}, env=env).max_inflight_batches == 4
    for bad in ("0", "-3"):
        with pytest.raises(ValueError, match=r"max_inflight_batches \(COMRECYCLE_ROUTER_MAX_INFLIGHT_BATCHES\): "
                                             r"expected an integer >= 1, got " + bad):
            RouterSettings.resolve({"max_inflight_batches": bad}, env={})
    for bad in ("four", "1.5"):
        with pytest.raises(ValueError, match=r"max_inflight_batches .*expected an integer, got '" + bad):
            RouterSettings.resolve({"max_inflight_batches": bad}, env={})
