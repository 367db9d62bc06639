"""The simulator's per-user stage cache: what the request filter (and the estimator's
`cache_state` input) sees. Pure; no models."""
import numpy as np

from comrecycle.sim.recycling import StageCache
from comrecycle.specs import CACHE_STATE


def _full(n_ret=10, n_pre=6, n_rank=4):
    return {"retrieval_items": np.arange(100, 100 + n_ret), "prerank_items": np.arange(100, 100 + n_pre),
            "rank_items": np.arange(100, 100 + n_rank), "rerank_items": np.arange(100, 102)}


def test_state_after_full_computation_and_exposure():
    c = StageCache(ttl_s=900)
    assert (c.state(7, 0.0) == -1).all() and c.state(7, 0.0).shape == CACHE_STATE.dims
    c.write(7, _full(), ts=10.0)
    np.testing.assert_array_equal(c.state(7, 15.0).reshape(3, 3), [[5, 1, 10], [5, 1, 6], [5, 1, 4]])
    c.remove_exposed(7, np.array([100, 101, 999]))
    np.testing.assert_array_equal(c.state(7, 15.0).reshape(3, 3)[:, 2], [8, 4, 2])


def test_pages_count_from_the_computation_and_reset_when_recomputed():
    c = StageCache(ttl_s=900)
    c.write(1, _full(), ts=0.0)
    c.write(1, {"rerank_items": np.arange(2)}, ts=5.0)  # strategy 3: nothing cached recomputed
    np.testing.assert_array_equal(c.state(1, 6.0).reshape(3, 3)[:, :2], [[6, 2], [6, 2], [6, 2]])
    c.write(1, {"rank_items": np.arange(3), "rerank_items": np.arange(2)}, ts=8.0)  # strategy 2
    np.testing.assert_array_equal(c.state(1, 9.0).reshape(3, 3)[:, :2], [[9, 3], [9, 3], [1, 1]])


def test_expired_emptied_and_cleared_lists_are_absent():
    c = StageCache(ttl_s=100)
    c.write(3, _full(n_rank=2), ts=0.0)
    c.remove_exposed(3, np.array([100, 101]))  # the rank list is used up
    s = c.state(3, 50.0).reshape(3, 3)
    assert (s[2] == -1).all() and (s[:2, 1] == 1).all()
    assert (c.state(3, 101.0) == -1).all()  # older than the TTL
    c.clear(3)
    assert (c.state(3, 1.0) == -1).all()
    # another user's entry is untouched
    c.write(4, _full(), ts=0.0)
    assert (c.state(3, 1.0) == -1).all() and (c.state(4, 1.0) >= 0).all()


class _Batch:
    def __init__(self, is_repeat, session_id=None):
        self.is_repeat = np.asarray(is_repeat)
        self.session_id = np.arange(self.is_repeat.size) if session_id is None else np.asarray(session_id)

    def __len__(self):
        return self.is_repeat.size


def test_weighted_random_logging_propensities_follow_the_available_arms():
    import pytest

    from comrecycle.sim.recycling import uniform_random_assignment

    n = 40_000
    avail = np.ones((n, 4), bool)
    avail[n // 2:, 3] = False  # half the requests cannot use strategy 3
    rep = np.ones(n, bool)
    rep[:100] = False
    s, p = uniform_random_assignment(0, [0.15, 0.1, 0.1, 0.65])(_Batch(rep), avail)
    assert (s[:100] == 0).all() and (p[:100] == 1).all()
    w = np.array([0.15, 0.1, 0.1, 0.65])
    for half, weights in ((slice(100, n // 2), w / w.sum()), (slice(n // 2, n), np.r_[w[:3], 0] / w[:3].sum())):
        freq = np.bincount(s[half], minlength=4) / s[half].size
        np.testing.assert_allclose(freq, weights, atol=0.015)
        np.testing.assert_allclose(p[half], weights[s[half]], rtol=1e-6)
    with pytest.raises(ValueError, match="arm weights: expected rows of 4 positive numbers"):
        uniform_random_assignment(0, [1, 0, 1, 1])


def test_session_mixture_logging_keeps_one_row_per_session_and_logs_its_propensity():
    from comrecycle.sim.recycling import uniform_random_assignment

    rows = np.array([[1, 1, 1, 1], [0.02, 0.03, 0.05, 0.9]])
    assign = uniform_random_assignment(3, rows)
    sessions = np.repeat(np.arange(2000), 10)  # 10 pages per session, every one a repeat here
    avail = np.ones((sessions.size, 4), bool)
    s, p = assign(_Batch(np.ones(sessions.size, bool), sessions), avail)
    # each session's propensities all come from one row
    per_session = p.reshape(2000, 10)
    row_probs = rows / rows.sum(axis=1, keepdims=True)
    uniform = np.isclose(per_session, 0.25).all(axis=1)
    deep = np.isin(per_session, row_probs[1].astype(np.float32)).all(axis=1)
    assert (uniform | deep).all() and not (uniform & deep).any()
    assert 0.4 < uniform.mean() < 0.6  # the row is drawn uniformly over sessions
    # in "deep" sessions strategy 3 is drawn ~90% of the time, with propensity 0.9
    sd = s.reshape(2000, 10)[deep]
    assert abs((sd == 3).mean() - 0.9) < 0.02
    np.testing.assert_allclose(per_session[deep][sd == 3], 0.9, rtol=1e-6)
    # the same session id gets the same row in a later batch
    s2, p2 = assign(_Batch(np.ones(20, bool), np.arange(20)), np.ones((20, 4), bool))
    np.testing.assert_array_equal(np.isclose(p2, 0.25), uniform[:20])
