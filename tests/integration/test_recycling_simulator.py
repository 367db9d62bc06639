"""Recycling inside the simulator (issue 3 item 1-2): cache semantics, randomised logs, and
the calibration guards of DESIGN.md §5 on the default model set (slow: real cascade runs)."""
import numpy as np
import pytest

from comrecycle.sim.recycling import StageCache, simulate_log

pytestmark = pytest.mark.slow


def test_cache_semantics():
    c = StageCache()
    c.write(1, {"retrieval_items": np.array([1, 2, 3]), "prerank_items": np.array([2, 3]),
                "rank_items": np.array([3]), "rerank_items": np.array([3])})
    assert (c.candidates(1, 1) == [1, 2, 3]).all() and (c.candidates(1, 3) == [3]).all()
    assert c.candidates(1, 0) is None and c.candidates(2, 1) is None  # never another user's items
    c.remove_exposed(1, np.array([3]))
    assert (c.candidates(1, 2) == [2]).all()
    assert c.candidates(1, 3) is None  # emptied by exposure -> unavailable
    c.clear(1)
    assert c.candidates(1, 1) is None


def test_randomised_log(tiny_model_set):
    t = simulate_log(tiny_model_set, 1200, seed=3, logging="random", concurrency=64, progress=False)
    rep = t["is_repeat"].to_numpy()
    s = t["strategy"].to_numpy()
    p = t["propensity"].to_numpy()
    q = np.stack([t[f"q_{j}"].to_numpy() for j in range(4)], 1)
    assert (s[~rep] == 0).all() and (p[~rep] == 1).all()  # initial requests always full
    counts = np.bincount(s[rep], minlength=4)
    assert counts.min() > 0.18 * rep.sum()  # ~uniform over the 4 strategies
    avail = (~np.isnan(q[rep])).sum(1)
    np.testing.assert_allclose(p[rep], 1.0 / avail, rtol=1e-6)
    served_q = q[np.arange(len(s)), s]
    np.testing.assert_allclose(served_q, t["expected_reward"].to_numpy(), rtol=1e-5)
    assert np.isnan(q[~rep, 1:]).all()
    cost = t["cost"].to_numpy()
    assert (cost[s == 0] == 1).all() and (cost[s == 3] < 0.5).all()


@pytest.fixture(scope="module")
def all_strategy3(default_model_set):
    return simulate_log(default_model_set, 3000, seed=11, strategy=3, concurrency=128, progress=False)


def test_recycling_everything_with_strategy3_costs_5_to_15_percent(all_strategy3):
    t = all_strategy3
    rep = t["is_repeat"].to_numpy() & (t["strategy"].to_numpy() == 3)
    q0, q3 = t["q_0"].to_numpy()[rep], t["q_3"].to_numpy()[rep]
    loss = 1 - q3.sum() / q0.sum()
    assert 0.05 <= loss <= 0.15, loss


def test_the_loss_is_heterogeneous(all_strategy3):
    t = all_strategy3
    rep = t["is_repeat"].to_numpy() & (t["strategy"].to_numpy() == 3)
    d = (t["q_0"].to_numpy() - t["q_3"].to_numpy())[rep]
    top = np.sort(d)[::-1][:len(d) // 10]
    assert top.sum() >= 0.4 * d.sum(), top.sum() / d.sum()


def test_loss_grows_with_waiting_and_with_cache_age(all_strategy3):
    t = all_strategy3
    rep = t["is_repeat"].to_numpy() & (t["strategy"].to_numpy() == 3)
    d = (t["q_0"].to_numpy() - t["q_3"].to_numpy())[rep]
    gap = t["secs_since_prev"].to_numpy()[rep]
    page = t["page"].to_numpy()[rep]
    assert d[gap > 120].mean() > d[gap < 10].mean()
    assert d[page >= 3].mean() > d[page == 1].mean()
