"""How a user's cache entry changes (router.state), as the request filter and the estimator's
`cache_state` input see it: the one implementation the router serves with on Triton, in-process
and in the simulator. Pure; no models."""
import numpy as np

from comrecycle.router.state import READS, apply_feedback, next_entry
from comrecycle.specs import CACHE_STATE

NONE = np.zeros(0, np.int64)


def _full(n_ret=10, n_pre=6, n_rank=4):
    return {"retrieval_items": np.arange(100, 100 + n_ret), "prerank_items": np.arange(100, 100 + n_pre),
            "rank_items": np.arange(100, 100 + n_rank), "rerank_items": np.arange(100, 102)}


def _served(entry, outputs, ts):
    return next_entry(entry, -1, outputs, np.asarray(outputs["rerank_items"])[:20], ts, "v")


def _view(entry, now, viewed=NONE, ttl_s=900):
    """(entry after the feedback, cache_state [3, 3], available [4])"""
    e, _, state, avail = apply_feedback(entry, viewed, NONE, now, ttl_s)
    return e, state.reshape(3, 3), avail


def test_state_after_full_computation_and_exposure():
    e = _served(None, _full(), 10.0)
    _, state, avail = _view(e, 15.0)
    assert state.size == int(np.prod(CACHE_STATE.dims)) and avail.all()
    np.testing.assert_array_equal(state, [[5, 1, 10], [5, 1, 6], [5, 1, 4]])
    e, state, _ = _view(e, 15.0, viewed=np.array([100, 101, 999]))
    np.testing.assert_array_equal(state[:, 2], [8, 4, 2])
    assert set(e.exposed.tolist()) == {100, 101, 999}


def test_pages_count_from_the_computation_and_reset_when_recomputed():
    e = _served(None, _full(), 0.0)
    e = _served(e, {"rerank_items": np.arange(2)}, 5.0)  # strategy 3: nothing cached recomputed
    np.testing.assert_array_equal(_view(e, 6.0)[1][:, :2], [[6, 2], [6, 2], [6, 2]])
    e = _served(e, {"rank_items": np.arange(3), "rerank_items": np.arange(2)}, 8.0)  # strategy 2
    np.testing.assert_array_equal(_view(e, 9.0)[1][:, :2], [[9, 3], [9, 3], [1, 1]])


def test_expired_and_emptied_lists_are_unavailable_and_strategies_read_their_own_list():
    e = _served(None, _full(n_rank=2), 0.0)
    e, state, avail = _view(e, 50.0, viewed=np.array([100, 101]), ttl_s=100)  # the rank list is used up
    assert (state[2] == -1).all() and (state[:2, 1] == 1).all() and avail.tolist() == [True, True, True, False]
    assert e.lists[READS[1]].items.tolist() == list(range(102, 110))  # strategy 1 reads retrieval
    assert e.lists[READS[2]].items.tolist() == list(range(102, 106))  # strategy 2 reads prerank
    _, state, avail = _view(e, 101.0, ttl_s=100)  # older than the TTL
    assert (state == -1).all() and avail.tolist() == [True, False, False, False]
