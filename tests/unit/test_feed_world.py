"""The feed world (sim/feed_world.py), the second log generator, and the whole offline pipeline
on its logs: logs from elsewhere (contract columns only, sparse ids, costs in ms) just work, and
λ certified off-policy keeps the budget on logs the estimator has never seen."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from comrecycle.sim.feed_world import COST_MS, simulate_feed_log
from comrecycle.sim.logs import LOG_SCHEMA

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def log():
    return simulate_feed_log(30_000, seed=1)


def test_contract_columns_only_with_ground_truth(log):
    assert log.column_names == list(LOG_SCHEMA.names) + ["q_0", "q_1", "q_2", "q_3"]
    for f in LOG_SCHEMA:
        assert log.schema.field(f.name).type == f.type, f.name
    assert 29_000 <= log.num_rows <= 30_000  # whole sessions up to the size asked for
    assert (np.diff(log["ts"].to_numpy()) >= 0).all()
    assert (log["request_id"].to_numpy() == np.arange(log.num_rows)).all()


def test_sparse_ids_and_costs_in_milliseconds(log):
    users = log["user_id"].to_numpy()
    items = np.concatenate([np.asarray(h) for h in log["history"].to_pylist() if h])
    for ids in (users, items):
        assert ids.min() >= 1 and ids.max() < 2 ** 40 and ids.max() > 2 ** 36  # spread over 40 bits
    s, c = log["strategy"].to_numpy(), log["cost"].to_numpy()
    means = np.array([c[s == j].mean() for j in range(4)])
    assert np.allclose(means, COST_MS * np.exp(0.005), rtol=0.03)  # log-normal noise, mean e^{σ²/2}


def test_traffic_and_the_trade_off(log):
    rep = log["is_repeat"].to_numpy()
    assert 0.62 < rep.mean() < 0.75
    q = np.stack([log[f"q_{j}"].to_numpy() for j in range(4)], 1).astype(np.float64)
    assert np.isnan(q[~rep, 1:]).all() and np.isfinite(q[rep]).all()
    dq = q[rep, :1] - q[rep, 1:]
    assert (dq >= 0).all()
    mean = dq.mean(0)
    assert mean[0] < mean[1] < mean[2]  # reusing an earlier stage's list loses less
    loss3 = dq[:, 2].sum() / q[:, 0].sum()
    assert 0.08 < loss3 < 0.3
    # the rewards are drawn around the served strategy's q
    t = log["strategy"].to_numpy()
    served = q[np.arange(len(t)), t]
    assert log["reward"].to_numpy().mean() == pytest.approx(served.mean(), rel=0.05)
    p = log["propensity"].to_numpy()
    assert set(np.round(np.unique(p[rep]), 4)) > {0.25}  # sessions log with different probabilities
    assert (p[~rep] == 1).all() and (t[~rep] == 0).all()


def test_seeds_are_reproducible_and_distinct():
    a, b, c = simulate_feed_log(2_000, seed=4), simulate_feed_log(2_000, seed=4), simulate_feed_log(2_000, seed=5)
    assert a.drop_columns(["q_1", "q_2", "q_3"]).equals(b.drop_columns(["q_1", "q_2", "q_3"]))
    for j in (1, 2, 3):  # NaN where nothing is cached
        assert np.array_equal(a[f"q_{j}"].to_numpy(), b[f"q_{j}"].to_numpy(), equal_nan=True)
    assert not np.isin(c["user_id"].to_numpy(), a["user_id"].to_numpy()).any()  # logs split by user


@pytest.mark.slow
def test_certified_budget_holds_on_unseen_feed_logs():
    """train → certify (95%) → decide on three logs of other users, three seeds: the realised
    loss stays within 1.15 × budget, and the policy saves compute."""
    from comrecycle.policy.pipeline import feed_world_check

    rows, _ = feed_world_check(40_000, [1, 2, 3], [0.01, 0.02], confidence=0.95, max_epochs=6, progress=False)
    held = [r["realised_loss_pct"] <= 115 * r["budget"] for r in rows]
    assert sum(held) >= len(rows) - 1, rows
    assert all(r["saved_pct"] > 0 for r in rows if r["budget"] == 0.02), rows
    assert all(r["saved_pct"] <= r["oracle_saved_pct"] + 1e-9 for r in rows)


def test_ranking_comparison_puts_every_ranking_below_the_oracle_and_fits_the_net_ceiling_on_true_q():
    """Each row is compute saved at equal true loss on the same test rows; the oracle ranks by
    the true ΔQ, so no ranking beats it by more than the discreteness of the λ sweep."""
    from comrecycle.estimator.effect_loss import EffectLossEstimator
    from comrecycle.policy.decide import costs_in_log
    from comrecycle.policy.pipeline import ranking_comparison

    train, test, ceiling = (simulate_feed_log(6_000, seed=s) for s in (21, 23, 24))
    costs, _ = costs_in_log(train)
    est = EffectLossEstimator(max_epochs=2, progress=False).fit(train)
    out = ranking_comparison(est, train, test, ceiling, costs, [1.0, 2.0])
    assert {"oracle", "GRU + MMoE", "feature ceiling", "feature ceiling (estimator inputs)",
            "best static"} <= set(out)
    for name, saved in out.items():
        assert all(s <= o + 0.5 for s, o in zip(saved, out["oracle"])), (name, saved, out["oracle"])
    assert out["oracle"][1] > 0


def cli(*args):
    return subprocess.run([sys.executable, "-m", "comrecycle.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900, cwd=ROOT)


@pytest.mark.slow
def test_commands_on_a_log_from_elsewhere(tmp_path):
    """The README's commands on logs that carry only the contract columns."""
    for name, seed in (("train", 11), ("solve", 12)):
        r = cli("simulate-feed", "--requests", 15_000, "--seed", seed, "--out", tmp_path / f"{name}.parquet")
        assert r.returncode == 0, r.stderr
    r = cli("train-estimator", "--logs", tmp_path / "train.parquet", "--out", tmp_path / "est", "--max-epochs", 2,
            "--no-baselines", "--quiet")
    assert r.returncode == 0, r.stderr
    r = cli("solve", "--logs", tmp_path / "solve.parquet", "--estimator", tmp_path / "est", "--budget", 0.02,
            "--out", tmp_path / "params.json")
    assert r.returncode == 0, r.stderr
    assert "mean `cost` per strategy in the log" in r.stdout
    p = json.loads((tmp_path / "params.json").read_text())
    assert np.allclose(p["costs"], COST_MS / COST_MS[0], rtol=0.05)
    assert p["certification"]["label"] == "clicks"  # no exposure columns in such a log
    r = cli("decide", "--logs", tmp_path / "solve.parquet", "--estimator", tmp_path / "est", "--params",
            tmp_path / "params.json", "--out", tmp_path / "dec.parquet")
    assert r.returncode == 0, r.stderr
    r = cli("evaluate", "--logs", tmp_path / "solve.parquet", "--decisions", tmp_path / "dec.parquet",
            "--params", tmp_path / "params.json", "--bootstrap", 20, "--out", tmp_path / "ev.json")
    assert r.returncode == 0, r.stderr
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert "exact" in ev["methods"]
    assert pq.read_table(tmp_path / "dec.parquet").num_rows == pq.read_table(tmp_path / "solve.parquet").num_rows
