"""The simulator's calibration guards (comrecycle.policy.guards), on synthetic logs whose answers are
known: the figures are computed right, and each guard can fail."""
import json

import numpy as np
import pyarrow as pa
import pytest

from comrecycle.cli import main
from comrecycle.policy.guards import guard_figures
from comrecycle.sim.logs import CACHE_STATE_COLUMN


def synthetic_log(n=4000, seed=0, click_effect=0.6, noise=0.05, s1_recovers=True, base=0.0):
    """Repeats whose ΔQ_3 = base + click_effect * prev_clicks (+ noise): invisible to the cache state."""
    rng = np.random.default_rng(seed)
    rep = rng.random(n) < 0.75
    clicks = rng.integers(0, 4, n)
    q0 = 2.0 + 0.1 * rng.standard_normal(n)
    d3 = base + click_effect * clicks + noise * rng.standard_normal(n)
    d2 = 0.8 * d3
    d1 = (0.1 if s1_recovers else 0.9) * d3
    q = np.stack([q0, q0 - d1, q0 - d2, q0 - d3], 1)
    q[~rep, 1:] = np.nan
    state = np.tile(np.array([5.0, 1, 900, 5.0, 1, 250, 5.0, 1, 80], np.float32), (n, 1))
    state[~rep] = -1
    return pa.table({
        "request_id": pa.array(np.arange(n), pa.int64()),
        "user_id": pa.array(rng.integers(0, 300, n), pa.int64()),
        "session_id": pa.array(np.arange(n), pa.int64()),
        "ts": pa.array(np.arange(n, dtype=np.float64)),
        "page": pa.array(rep.astype(np.int16)),
        "is_repeat": pa.array(rep),
        "prev_clicks": pa.array(clicks.astype(np.int32)),
        "secs_since_prev": pa.array(np.where(rep, 5.0, -1.0).astype(np.float32)),
        "prev_exposures": pa.array(np.full(n, 6, np.int32)),
        "gender": pa.array(np.zeros(n, np.int8)), "age": pa.array(np.zeros(n, np.int8)),
        "country": pa.array(np.zeros(n, np.int16)),
        "history": pa.array([[1, 2, 3]] * n, pa.list_(pa.int64())),
        "strategy": pa.array(np.zeros(n, np.int8)), "propensity": pa.array(np.ones(n, np.float32)),
        "reward": pa.array(q0.astype(np.float32)), "cost": pa.array(np.ones(n, np.float32)),
        **{f"q_{j}": pa.array(q[:, j].astype(np.float32)) for j in range(4)},
        "cache_state": pa.FixedSizeListArray.from_arrays(pa.array(state.reshape(-1)), 9).cast(CACHE_STATE_COLUMN.type),
    })


def test_figures_match_their_definitions():
    log = synthetic_log()
    f = guard_figures(log, [1.0, 0.3, 0.7, 0.05])
    q = np.stack([log[f"q_{j}"].to_numpy() for j in range(4)], 1).astype(np.float64)
    rep = log["is_repeat"].to_numpy()
    assert f["loss_s3"] == pytest.approx(1 - q[rep, 3].sum() / q[rep, 0].sum(), rel=1e-6)
    d3 = np.sort(q[rep, 0] - q[rep, 3])[::-1]
    assert f["top10_share"] == pytest.approx(d3[:d3.size // 10].sum() / d3.sum(), rel=1e-6)
    assert f["dq_ordered"] and f["checks"]["dq_ordered"]
    # ΔQ_3 is explained by prev_clicks, not by the (constant) cache state
    assert f["r2_cache"] < 0.05 and f["r2_all"] > 0.9 and f["checks"]["r2_gain"]
    # strategy 1 recovers 90% of the loss at a low cost: the oracle uses it
    assert f["oracle_s12_share"] > 0.03 and f["checks"]["oracle_s12_share"]
    assert sum(f["oracle_mix"]) == pytest.approx(1.0)
    by_clicks = f["dq3_by_prev_clicks"]
    assert by_clicks[0] < by_clicks[1] < by_clicks[2]  # ΔQ_3 = 0.6 * clicks
    assert f["dq3_by_gap"][0] is not None and f["dq3_by_gap"][2] is None  # every synthetic gap is 5 s


def test_each_guard_can_fail():
    f = guard_figures(synthetic_log(click_effect=0.0, noise=0.3, s1_recovers=False), [1.0, 0.8, 0.7, 0.05])
    assert not f["checks"]["r2_gain"]  # noise only: no feature explains it
    assert not f["checks"]["loss_s3"]  # ~0 loss on average
    # noise: when the net loss is positive the top decile "carries" > 100% of it; when it is
    # not, the share is undefined and the guard fails
    assert (f["top10_share"] is None and not f["checks"]["top10_share"]) or f["top10_share"] > 1
    f = guard_figures(synthetic_log(click_effect=0.0, noise=0.0, base=0.2), [1.0, 0.8, 0.7, 0.05])
    assert f["top10_share"] == pytest.approx(0.1) and not f["checks"]["top10_share"]  # spread evenly
    f = guard_figures(synthetic_log(click_effect=0.0, noise=0.0, base=-0.2), [1.0, 0.8, 0.7, 0.05])
    assert f["dq3_one_page"] < 0 and not f["checks"]["dq3_one_page"]  # recycling gains: nothing to decide
    assert f["top10_share"] is None and not f["checks"]["top10_share"]
    f = guard_figures(synthetic_log(click_effect=0.6, s1_recovers=False), [1.0, 0.8, 0.7, 0.05])
    assert not f["checks"]["oracle_s12_share"]  # strategy 1 recovers little: never worth its price
    assert not f["checks"]["dq_ordered"]  # ΔQ_1 > ΔQ_2


def test_needs_ground_truth():
    with pytest.raises(ValueError, match="ground-truth columns"):
        guard_figures(synthetic_log().drop(["q_2"]), [1.0, 0.8, 0.7, 0.05])
    with pytest.raises(ValueError, match="cache_state"):
        guard_figures(synthetic_log().drop(["cache_state"]), [1.0, 0.8, 0.7, 0.05])


def test_check_simulator_cli(tmp_path, capsys):
    import pyarrow.parquet as pq

    p = tmp_path / "log.parquet"
    pq.write_table(synthetic_log(), p)
    rc = main(["check-simulator", "--logs", str(p), "--costs", "0.3,0.7,0.05", "--out", str(tmp_path / "g.json")])
    out = capsys.readouterr().out
    assert "| guard | value | holds |" in out
    fig = json.loads((tmp_path / "g.json").read_text())
    assert rc == (0 if all(fig["checks"].values()) else 1)
    assert main(["check-simulator", "--logs", str(p), "--costs", "0.3,0.7"]) == 2
    assert "expected 3 finite numbers" in capsys.readouterr().err
    assert main(["check-simulator", "--logs", str(p), "--models", str(tmp_path)]) == 2
    assert "no cost profile" in capsys.readouterr().err
    (tmp_path / "cost_profile.json").write_text('{"strategy_cost": {"0": 1.0}}')
    assert main(["check-simulator", "--logs", str(p), "--models", str(tmp_path)]) == 2
    assert "expected a cost profile with strategy_cost" in capsys.readouterr().err


def test_feature_ceiling_reaches_the_oracle_only_when_features_explain_the_loss():
    from comrecycle.policy.frontier import frontier

    costs = [1.0, 0.3, 0.7, 0.05]
    explained = frontier(synthetic_log(seed=1), costs, budgets=(0.01, 0.05), ceiling_log=synthetic_log(seed=2))
    noise = frontier(synthetic_log(seed=1, click_effect=0.0, noise=0.5, base=0.3), costs, budgets=(0.01,),
                     ceiling_log=synthetic_log(seed=2, click_effect=0.0, noise=0.5, base=0.3))
    for row in explained["table"]:
        assert row["feature ceiling / oracle"] > 0.9, row
    for row in noise["table"]:  # the oracle spends per-request noise no feature shows
        assert row["feature ceiling / oracle"] < 0.85, row
    assert "best dcaf" in explained["table"][0]


def test_feature_ceiling_needs_a_randomised_training_log():
    from comrecycle.policy.frontier import feature_ceiling

    small = synthetic_log(n=60)
    with pytest.raises(ValueError, match="expected at least 100"):
        feature_ceiling(small, synthetic_log())


def test_logs_without_counterfactuals_are_refused():
    """A --logging full log has q_0 only: the guards and the frontier say so instead of reporting zeros."""
    from comrecycle.policy.frontier import frontier

    log = synthetic_log()
    for j in (1, 2, 3):
        log = log.set_column(log.column_names.index(f"q_{j}"), f"q_{j}",
                             pa.array(np.full(log.num_rows, np.nan, np.float32)))
    with pytest.raises(ValueError, match="--logging full log carries q_0 only"):
        guard_figures(log, [1.0, 0.8, 0.7, 0.05])
    with pytest.raises(ValueError, match="--logging full log carries q_0 only"):
        frontier(log, [1.0, 0.8, 0.7, 0.05])
