"""Reweighting a randomised log to the served traffic's states (policy/shift.py)."""
import numpy as np
import pyarrow as pa
import pytest

from comrecycle.policy.shift import (STATE_FEATURES, ShiftError, clip_and_normalise, density_ratio,
                                     served_traffic_weights, state_features)
from comrecycle.specs import N_RECYCLE


def test_density_ratio_recovers_a_known_shift():
    """x_log ~ N(0, 1), x_served ~ N(0.6, 1): the ratio is exp(0.6 x − 0.18); the cross-fitted
    classifier's weights reproduce the served mean and track the true ratio."""
    rng = np.random.default_rng(0)
    x_log = rng.normal(0, 1, (20_000, 2))
    x_srv = rng.normal(0, 1, (20_000, 2))
    x_srv[:, 0] += 0.6
    ratio, auc = density_ratio(x_log, x_srv, folds=3)
    true = np.exp(0.6 * x_log[:, 0] - 0.18)
    assert 0.6 < auc < 0.7  # Φ(0.6 / √2) = 0.66
    w, _ = clip_and_normalise(ratio, 20.0)
    assert np.average(x_log[:, 0], weights=w) == pytest.approx(0.6, abs=0.05)
    assert np.average(x_log[:, 1], weights=w) == pytest.approx(0.0, abs=0.05)
    inner = np.abs(x_log[:, 0]) < 2
    assert np.corrcoef(np.log(ratio[inner]), np.log(true[inner]))[0, 1] > 0.9


def test_no_shift_gives_weights_near_one():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (16_000, 3))
    ratio, auc = density_ratio(x[:8000], x[8000:], folds=4)
    w, clipped = clip_and_normalise(ratio, 20.0)
    assert abs(auc - 0.5) < 0.03
    assert clipped == 0
    assert np.quantile(w, 0.9) < 1.3 and np.quantile(w, 0.1) > 0.7


def test_clipping_keeps_mean_one_and_the_cap():
    rng = np.random.default_rng(2)
    ratio = np.exp(rng.normal(0, 2.0, 5000))
    w, clipped = clip_and_normalise(ratio, 10.0)
    assert w.mean() == pytest.approx(1.0, rel=1e-9)
    assert w.max() <= 10.0 + 1e-9
    assert 0 < clipped < 0.1
    order = np.argsort(ratio)
    assert (np.diff(w[order]) >= -1e-12).all()  # the order of the ratios is kept
    with pytest.raises(ShiftError, match="cap above 1"):
        clip_and_normalise(ratio, 1.0)


def _log(n: int, seed: int, fresh: float) -> pa.Table:
    """Repeated requests whose rank list has served 1 page with probability `fresh`, else 2–5."""
    from comrecycle.sim.logs import LOG_SCHEMA

    rng = np.random.default_rng(seed)
    rep = np.arange(n) % 4 != 0
    pages = np.where(rng.random(n) < fresh, 1, rng.integers(2, 6, n)).astype(np.float32)
    cs = np.full((n, N_RECYCLE, 3), -1.0, np.float32)
    cs[rep, 2] = np.stack([10.0 * pages[rep], pages[rep], 200.0 - 20 * pages[rep]], 1)
    cols = {
        "request_id": np.arange(n, dtype=np.int64), "user_id": np.arange(n, dtype=np.int64) // 4,
        "session_id": np.arange(n, dtype=np.int64) // 4, "ts": np.arange(n, dtype=np.float64),
        "page": (np.arange(n) % 4).astype(np.int16), "is_repeat": rep,
        "gender": np.zeros(n, np.int8), "age": np.zeros(n, np.int8), "country": np.zeros(n, np.int16),
        "secs_since_prev": np.where(rep, 5.0, -1.0).astype(np.float32), "prev_exposures": np.zeros(n, np.int32),
        "prev_clicks": np.zeros(n, np.int32), "strategy": np.where(rep, 3, 0).astype(np.int8),
        "propensity": np.ones(n, np.float32), "reward": np.zeros(n, np.float32), "cost": np.ones(n, np.float32),
    }
    t = pa.table({k: pa.array(v, LOG_SCHEMA.field(k).type) for k, v in cols.items()})
    t = t.append_column("history", pa.array([[1, 2, 3]] * n, pa.list_(pa.int64())))
    flat = pa.array(cs.reshape(n, -1).tolist(), pa.list_(pa.float32(), N_RECYCLE * 3))
    return t.append_column("cache_state", flat)


def test_served_traffic_weights_favour_the_served_states():
    log, served = _log(8000, 0, fresh=0.3), _log(8000, 1, fresh=0.8)
    sw = served_traffic_weights(log, served, folds=3)
    rep = log["is_repeat"].to_numpy()
    assert sw.weights.shape == (log.num_rows,)
    assert (sw.weights[~rep] == 1).all() and sw.weights[rep].mean() == pytest.approx(1.0)
    pages = np.asarray(log["cache_state"].combine_chunks().flatten()).reshape(-1, 9)[:, 7]
    fresh_share = np.average(pages[rep] == 1, weights=sw.weights[rep])
    assert fresh_share == pytest.approx(0.8, abs=0.03)
    assert sw.auc > 0.6 and 0 < sw.effective_share < 1
    assert state_features(log).shape == (log.num_rows, len(STATE_FEATURES))


def test_served_traffic_needs_cache_state_and_enough_rows():
    log = _log(2000, 0, 0.5)
    with pytest.raises(ShiftError, match="cache_state"):
        served_traffic_weights(log, log.drop_columns(["cache_state"]))
    with pytest.raises(ShiftError, match="at least 100 repeated requests"):
        served_traffic_weights(log, log.slice(0, 40))
