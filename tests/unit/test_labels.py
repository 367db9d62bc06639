"""View-adjusted clicks (comrecycle/estimator/labels.py): unbiased, less noisy, clear errors."""
import numpy as np
import pyarrow as pa
import pytest

from comrecycle.estimator.labels import examination_curve, training_labels, view_adjusted_clicks


def _sessions(rng, n, n_items=60, page=20, stop=0.12, short_share=0.2):
    """n pages of random items with known click probabilities; examination depth independent of
    the items (1 + geometric), capped by the page length. Returns the log-like lists, the true
    expected clicks of each page and the click probabilities per item."""
    p_item = rng.uniform(0.02, 0.6, n_items)
    item_ids = 1000 + np.arange(n_items) * 7
    pages, n_viewed, clicked, expected = [], [], [], []
    survival = (1 - stop) ** np.arange(page)
    for _ in range(n):
        L = int(rng.integers(5, page)) if rng.random() < short_share else page
        idx = rng.choice(n_items, L, replace=False)
        depth = min(int(rng.geometric(stop)), L)
        c = rng.random(L) < p_item[idx]
        c[depth:] = False
        pages.append(item_ids[idx])
        n_viewed.append(depth)
        clicked.append(item_ids[idx][c])
        expected.append(float((survival[:L] * p_item[idx]).sum()))
    return pages, np.array(n_viewed), clicked, np.array(expected)


def test_examination_curve_recovers_the_survival_despite_short_pages():
    rng = np.random.default_rng(0)
    pages, nv, _, _ = _sessions(rng, 20_000, short_share=0.5)
    lens = np.array([len(p) for p in pages])
    s = examination_curve(lens, nv)
    truth = (1 - 0.12) ** np.arange(20)
    np.testing.assert_allclose(s, truth, atol=0.015)
    # the naive share of pages viewed beyond k, ignoring the cap, is biased low at depth
    naive = (nv[:, None] > np.arange(20)).mean(0)
    assert naive[15] < truth[15] - 0.03


def test_view_adjusted_clicks_are_unbiased_and_less_noisy():
    rng = np.random.default_rng(1)
    pages, nv, clicked, expected = _sessions(rng, 30_000)
    y, info = view_adjusted_clicks(pages, nv, clicked)
    clicks = np.array([len(c) for c in clicked], float)
    se = np.std(y - expected) / np.sqrt(len(y))
    assert abs((y - expected).mean()) < 4 * se
    assert np.var(y - expected) < 0.6 * np.var(clicks - expected)
    assert info["rows"] == 30_000 and 0 < info["mean_ctr"] < 1


def test_a_rows_own_click_does_not_enter_its_correction():
    # an item seen only on this page: its rate is the prior (the log's mean rate), not its own click
    pages = [np.array([1, 2]), np.array([3, 4]), np.array([3, 4])]
    nv = np.array([1, 2, 2])
    clicked = [np.array([1]), np.array([3]), np.array([], np.int64)]
    y, info = view_adjusted_clicks(pages, nv, clicked, prior_views=1.0)
    ctr = info["mean_ctr"]
    assert ctr == pytest.approx(2 / 5)
    v = examination_curve(np.array([2, 2, 2]), nv)  # [1, 2/3]
    # row 0: item 1 viewed (rate = prior), item 2 not viewed (rate = prior)
    assert y[0] == pytest.approx(1 - ((1 - v[0]) * ctr + (0 - v[1]) * ctr))
    # row 1: item 3 seen once elsewhere without a click -> (0 + ctr) / (1 + 1)
    p3, p4 = (0 + ctr) / 2, (0 + ctr) / 2
    assert y[1] == pytest.approx(1 - ((1 - v[0]) * p3 + (1 - v[1]) * p4))


def test_empty_pages_and_no_clicks():
    y, _ = view_adjusted_clicks([np.array([], np.int64)] * 3, np.zeros(3), [np.array([], np.int64)] * 3)
    assert y.tolist() == [0, 0, 0]
    y, info = view_adjusted_clicks([np.array([5, 6])], np.array([1]), [np.array([], np.int64)])
    assert info["mean_ctr"] == 0 and y.tolist() == [0]


@pytest.mark.parametrize("pages,nv,clicked,message", [
    ([np.array([1, 2])], [3], [np.array([], np.int64)], "n_viewed must be in 0..len"),
    ([np.array([1, 2])], [1], [np.array([2])], "click outside its first n_viewed"),
    ([np.array([1, 2])], [2], [np.array([9])], "not on the page"),
    ([np.array([1, 2])], [1, 1], [np.array([1])], "same rows"),
])
def test_inconsistent_exposure_columns_are_clear_errors(pages, nv, clicked, message):
    with pytest.raises(ValueError, match=message):
        view_adjusted_clicks(pages, np.array(nv), clicked)


def test_training_labels_need_the_exposure_columns():
    t = pa.table({"reward": pa.array([1.0, 2.0], pa.float32())})
    y, info = training_labels(t, "clicks")
    assert y.tolist() == [1.0, 2.0] and info == {"label": "clicks"}
    with pytest.raises(ValueError, match="lacks \\['n_viewed', 'page_items', 'clicked_items'\\]"):
        training_labels(t, "view-adjusted")
    with pytest.raises(ValueError, match="label must be one of"):
        training_labels(t, "watch-time")


def test_simulator_log_labels_match_its_expected_clicks(tiny_random_log):
    y, info = training_labels(tiny_random_log, "view-adjusted")
    e = tiny_random_log["expected_reward"].to_numpy()
    r = tiny_random_log["reward"].to_numpy()
    assert y.shape == r.shape and np.isfinite(y).all()
    assert abs((y - e).mean()) < 4 * np.std(y - e) / np.sqrt(len(y))
    assert np.var(y - e) < np.var(r - e)
