"""Off-policy evaluation (IPW / SNIPW / DR / exact) on synthetic randomised logs with a known
ground truth, and the decision alignment's errors."""
import numpy as np
import pyarrow as pa
import pytest

from comrecycle.policy.ope import EvaluationError, align_decisions, evaluate

COSTS = np.array([1.0, 0.9, 0.8, 0.05])


def _log(n=40_000, seed=0):
    rng = np.random.default_rng(seed)
    rep = rng.random(n) < 0.75
    q = np.stack([rng.uniform(1.0, 3.0, n)] * 4, 1)
    q[:, 1:] = np.maximum(q[:, 1:] - rng.gamma(1.0, 0.05, (n, 3)) * np.array([1, 2, 4]), 0.1)
    t = np.where(rep, rng.integers(0, 4, n), 0)
    p = np.where(rep, 0.25, 1.0)
    r = rng.poisson(q[np.arange(n), t]).astype(np.float32)
    cols = {"request_id": np.arange(n, dtype=np.int64) * 7 + 3, "session_id": np.arange(n, dtype=np.int64) // 4,
            "is_repeat": rep, "strategy": t.astype(np.int8), "propensity": p.astype(np.float32), "reward": r}
    for j in range(4):
        cols[f"q_{j}"] = np.where(rep | (j == 0), q[:, j], np.nan).astype(np.float32)
    return pa.table(cols), q


def _decisions(log, s):
    return pa.table({"request_id": log["request_id"], "strategy": pa.array(np.asarray(s, np.int8))})


def test_always_full_loses_nothing_and_saves_nothing():
    log, _ = _log(4000)
    pi = align_decisions(log, _decisions(log, np.zeros(log.num_rows)))
    res = evaluate(log, pi, COSTS, n_boot=20)
    assert res["compute_saved_pct"] == pytest.approx(0.0)
    for m in ("ipw", "snipw", "exact"):
        assert res["methods"][m]["effect_loss_pct"] == pytest.approx(0.0, abs=1e-9)


def test_ipw_and_snipw_recover_the_exact_loss_within_their_interval():
    log, q = _log()
    rep = log["is_repeat"].to_numpy()
    pi = np.where(rep, 3, 0)  # strategy 3 everywhere: loses the most
    res = evaluate(log, align_decisions(log, _decisions(log, pi)), COSTS, q_hat=q, n_boot=200, seed=1)
    exact = res["methods"]["exact"]["effect_loss_pct"]
    truth = 100 * (1 - q[np.arange(len(pi)), pi].sum() / q[:, 0].sum())
    assert exact == pytest.approx(truth, rel=1e-5)
    for m in ("ipw", "snipw", "dr"):
        lo, hi = res["methods"][m]["ci95"]
        se = (hi - lo) / 3.92  # bootstrap standard error
        assert abs(res["methods"][m]["effect_loss_pct"] - truth) < 4 * se, (m, lo, truth, hi)
    # DR with the true Q removes the assignment noise: a narrower interval than IPW
    w = lambda m: np.diff(res["methods"][m]["ci95"])[0]  # noqa: E731
    assert w("dr") < w("ipw")
    assert res["compute_saved_pct"] == pytest.approx(100 * rep.mean() * (1 - 0.05), rel=1e-6)


def test_alignment_follows_request_ids_not_row_order():
    log, _ = _log(100)
    s = np.where(log["is_repeat"].to_numpy(), 2, 0)
    d = _decisions(log, s)
    perm = np.random.default_rng(0).permutation(100)
    np.testing.assert_array_equal(align_decisions(log, d.take(perm)), s)


@pytest.mark.parametrize("make,message", [
    (lambda log, d: d.slice(0, 90), "no decision for 10 of 100 logged requests"),
    (lambda log, d: pa.concat_tables([d, d.slice(0, 1)]), "1 duplicated request_id"),
    (lambda log, d: d.drop(["strategy"]), "missing column 'strategy'"),
    (lambda log, d: d.set_column(1, "strategy", pa.array(np.full(100, 7, np.int8))), "strategy must be in 0..3"),
    (lambda log, d: d.set_column(1, "strategy", pa.array(np.full(100, 1, np.int8))),
     "initial requests have nothing cached and must get strategy 0"),
])
def test_bad_decisions_are_clear_errors(make, message):
    log, _ = _log(100)
    d = _decisions(log, np.zeros(100))
    with pytest.raises(EvaluationError, match=message):
        align_decisions(log, make(log, d))


def test_choosing_an_unavailable_strategy_is_an_error_with_ground_truth():
    log, _ = _log(100)
    q1 = log["q_1"].to_numpy().copy()
    rep = log["is_repeat"].to_numpy()
    q1[np.flatnonzero(rep)[0]] = np.nan
    log = log.set_column(log.column_names.index("q_1"), "q_1", pa.array(q1))
    pi = align_decisions(log, _decisions(log, np.where(rep, 1, 0)))
    with pytest.raises(EvaluationError, match="unavailable"):
        evaluate(log, pi, COSTS, n_boot=0)


def test_view_adjusted_reward_is_what_the_estimates_average(tiny_random_log):
    # (its lower noise is tested in test_labels.py; on 1 500 rows the propensity weights
    # dominate the interval widths)
    from comrecycle.estimator.labels import training_labels

    log = tiny_random_log
    q3 = log["q_3"].to_numpy()
    pi = np.where(log["is_repeat"].to_numpy() & np.isfinite(q3), 3, 0)
    pi = align_decisions(log, _decisions(log, pi))
    adjusted = evaluate(log, pi, COSTS, n_boot=200, seed=3, label="view-adjusted")["methods"]
    clicks = evaluate(log, pi, COSTS, n_boot=200, seed=3)["methods"]
    y = training_labels(log, "view-adjusted")[0]
    relabelled = log.set_column(log.column_names.index("reward"), "reward", pa.array(y, pa.float32()))
    same = evaluate(relabelled, pi, COSTS, n_boot=200, seed=3)["methods"]
    for m in ("ipw", "snipw"):
        assert adjusted[m]["effect_loss_pct"] == pytest.approx(same[m]["effect_loss_pct"], rel=1e-5)
        assert adjusted[m]["effect_loss_pct"] != pytest.approx(clicks[m]["effect_loss_pct"], rel=1e-3)
    assert adjusted["exact"] == clicks["exact"]  # the ground truth does not depend on the label


def test_view_adjusted_reward_needs_the_exposure_columns():
    log, _ = _log(400)
    pi = align_decisions(log, _decisions(log, np.zeros(log.num_rows)))
    with pytest.raises(EvaluationError, match="lacks"):
        evaluate(log, pi, COSTS, n_boot=5, label="view-adjusted")
