"""Uplift evaluation (comrecycle.estimator.evaluation) and the baseline estimators: closed forms,
an independent O(n^2) reference, IPW, ranking order, sign convention, T-learner, plot, report."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from comrecycle.estimator.baselines import ConstantModel, TLearner
from comrecycle.estimator.evaluation import (auuc, auuc_random, average_uplift, evaluate_uplift, qini_coefficient,
                                             qini_curve, treatment_curves, uplift_curve)
from comrecycle.estimator.uplift_report import plot_uplift_curves, report_markdown


# --------------------------------------------------------------------------- closed forms

def test_closed_form_no_ties():
    tau = [4.0, 3.0, 2.0, 1.0]
    treated = [True, False, True, False]
    y = [1.0, 0.0, 0.0, 1.0]
    frac, up = uplift_curve(tau, treated, y)
    np.testing.assert_allclose(frac, [0, 0.25, 0.5, 0.75, 1.0])
    # k=1: (1 - 0)*1; k=2: (1 - 0)*2; k=3: (1/2 - 0)*3; k=4: (1/2 - 1/2)*4
    np.testing.assert_allclose(up, [0, 1, 2, 1.5, 0])
    _, qn = qini_curve(tau, treated, y)
    np.testing.assert_allclose(qn, [0, 1, 1, 1, 0])  # k=4: 1 - 1 * 2/2
    # trapezoid: 0.25 * (0.5 + 1.5 + 1.75 + 0.75) = 1.125, / n=4
    assert auuc(tau, treated, y) == pytest.approx(0.28125)
    assert auuc_random(treated, y) == pytest.approx(0.0)
    # Qini area 0.25 * (0.5 + 1 + 1 + 0.5) = 0.75, random line area 0, / 4
    assert qini_coefficient(tau, treated, y) == pytest.approx(0.1875)
    # input order does not matter
    perm = [2, 0, 3, 1]
    assert auuc(np.take(tau, perm), np.take(treated, perm), np.take(y, perm)) == pytest.approx(0.28125)


def test_closed_form_ties_are_grouped_and_order_free():
    # two tie groups {rows 0,1} and {rows 2,3}: the curve is exact at k=2, 4, linear in between
    tau = np.array([1.0, 1.0, 0.0, 0.0])
    treated = np.array([1, 0, 1, 0])
    y = np.array([1.0, 0.0, 0.0, 0.0])
    for perm in ([0, 1, 2, 3], [1, 0, 3, 2]):
        frac, up = uplift_curve(tau[perm], treated[perm], y[perm])
        _, qn = qini_curve(tau[perm], treated[perm], y[perm])
        np.testing.assert_allclose(up, [0, 1, 2, 2, 2])
        np.testing.assert_allclose(qn, [0, 0.5, 1, 1, 1])
        assert auuc(tau[perm], treated[perm], y[perm]) == pytest.approx(1.5 / 4)
        assert auuc_random(treated[perm], y[perm]) == pytest.approx(2 / 8)
        assert qini_coefficient(tau[perm], treated[perm], y[perm]) == pytest.approx((0.75 - 0.5) / 4)
    # a constant score is exactly the random line
    rng = np.random.default_rng(3)
    tr, yy = rng.integers(0, 2, 50), rng.poisson(1.0, 50).astype(float)
    tr[:2] = [0, 1]
    frac, up = uplift_curve(np.zeros(50), tr, yy)
    np.testing.assert_allclose(up, frac * up[-1], atol=1e-12)
    assert auuc(np.zeros(50), tr, yy) == pytest.approx(auuc_random(tr, yy), abs=1e-12)
    assert qini_coefficient(np.zeros(50), tr, yy) == pytest.approx(0.0, abs=1e-12)


def test_closed_form_weighted():
    # weights 1/p = 2, 4 -> normalised to mean 1: 2/3, 4/3
    frac, up = uplift_curve([2.0, 1.0], [True, False], [3.0, 1.0], propensity=[0.5, 0.25])
    np.testing.assert_allclose(frac, [0, 1 / 3, 1])
    np.testing.assert_allclose(up, [0, 3 * 2 / 3, (3 - 1) * 2])
    _, qn = qini_curve([2.0, 1.0], [True, False], [3.0, 1.0], propensity=[0.5, 0.25])
    np.testing.assert_allclose(qn, [0, 2, 2 - (4 / 3) * (2 / 3) / (4 / 3)])
    # equal propensities give exactly the unweighted curves
    rng = np.random.default_rng(0)
    tau, tr, yy = rng.normal(size=40), rng.integers(0, 2, 40), rng.normal(size=40)
    for a, b in zip(uplift_curve(tau, tr, yy, np.full(40, 0.25)), uplift_curve(tau, tr, yy)):
        np.testing.assert_allclose(a, b, atol=1e-12)


# --------------------------------------------------------------------------- independent reference

def _reference_curves(tau, treated, y, w):
    """Straightforward O(n^2): for each k, explicit sums over the top-k rows (no ties)."""
    n = len(tau)
    order = sorted(range(n), key=lambda i: -tau[i])
    w = [wi / (sum(w) / n) for wi in w]
    frac, up, qn = [0.0], [0.0], [0.0]
    for k in range(1, n + 1):
        top = order[:k]
        wt = sum(w[i] for i in top if treated[i])
        wc = sum(w[i] for i in top if not treated[i])
        yt = sum(w[i] * y[i] for i in top if treated[i])
        yc = sum(w[i] * y[i] for i in top if not treated[i])
        mt = yt / wt if wt > 0 else 0.0
        mc = yc / wc if wc > 0 else 0.0
        frac.append((wt + wc) / n)
        up.append((mt - mc) * (wt + wc))
        qn.append(yt - (yc * wt / wc if wc > 0 else 0.0))
    return np.array(frac), np.array(up), np.array(qn)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_quadratic_reference(seed, weighted):
    rng = np.random.default_rng(seed)
    n = 60
    tau = rng.permutation(n).astype(float)  # distinct scores
    treated = rng.random(n) < 0.4
    treated[:2] = [True, False]
    y = rng.poisson(1.5, n).astype(float)
    p = rng.uniform(0.1, 1.0, n) if weighted else None
    rf, ru, rq = _reference_curves(tau.tolist(), treated.tolist(), y.tolist(),
                                   (1 / p).tolist() if weighted else [1.0] * n)
    frac, up = uplift_curve(tau, treated, y, p)
    _, qn = qini_curve(tau, treated, y, p)
    np.testing.assert_allclose(frac, rf, atol=1e-10)
    np.testing.assert_allclose(up, ru, atol=1e-10)
    np.testing.assert_allclose(qn, rq, atol=1e-10)
    ref_area = np.sum(np.diff(rf) * (ru[1:] + ru[:-1]) / 2) / n
    assert auuc(tau, treated, y, p) == pytest.approx(ref_area, abs=1e-12)


def test_matches_scikit_uplift():
    """scikit-uplift (a test dependency, requirements.lock) is the reference: its curves must
    equal ours at every tie-group end."""
    import sklift.metrics as sk
    rng = np.random.default_rng(11)
    for _ in range(5):
        n = int(rng.integers(10, 300))
        tau = np.round(rng.normal(size=n), 1)  # many ties
        tr = rng.integers(0, 2, n)
        tr[:2] = [0, 1]
        y = rng.integers(0, 2, n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sklift uses sklearn's deprecated stable_cumsum
            xs, us = sk.uplift_curve(y, tau, tr)
            xq, qs = sk.qini_curve(y, tau, tr)
        np.testing.assert_allclose(uplift_curve(tau, tr, y)[1][xs], us, atol=1e-10)
        np.testing.assert_allclose(qini_curve(tau, tr, y)[1][xq], qs, atol=1e-10)


# --------------------------------------------------------------------------- ranking and sign

def _hetero_log(seed, n=12000, k=3, noise=0.3):
    """Randomised log with a known heterogeneous loss ΔQ_j(x) = 0.15 j (0.2 + x0^2 + x1)."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 1, (n, 3))
    base = 1.0 + 0.5 * X[:, 2]
    dq = 0.15 * np.arange(1, k + 1)[None, :] * (0.2 + X[:, :1] ** 2 + X[:, 1:2])  # [n, K]
    q = np.concatenate([base[:, None], base[:, None] - dq], axis=1)  # [n, K+1]
    t = rng.integers(0, k + 1, n)
    y = q[np.arange(n), t] + rng.normal(0, noise, n)
    return X, t, y, np.full(n, 1 / (k + 1)), q, dq


@pytest.mark.parametrize("seed", range(4))
def test_oracle_beats_random_beats_anti_oracle(seed):
    X, t, y, p, q, dq = _hetero_log(seed)
    rng = np.random.default_rng(100 + seed)
    res = {name: evaluate_uplift(d, t, y, p)["per_treatment"]
           for name, d in {"oracle": dq, "random": rng.normal(size=dq.shape), "anti": -dq}.items()}
    for j in (1, 2, 3):
        o, r, a = (res[m][j] for m in ("oracle", "random", "anti"))
        assert o["auuc_random"] == pytest.approx(r["auuc_random"]) == pytest.approx(a["auuc_random"])
        assert o["auuc_random"] < 0  # recycling loses on average
        # the oracle's lift over the random line is ~0.017 j clicks per request here; sampling
        # noise of a random score's AUUC is ~0.003
        m = 0.008 * j
        assert o["auuc"] > r["auuc"] + m and r["auuc"] > a["auuc"] + m
        assert abs(r["auuc"] - r["auuc_random"]) < 0.4 * (o["auuc"] - o["auuc_random"])
        assert o["qini"] > r["qini"] + m / 2 and r["qini"] > a["qini"] + m / 2
        assert o["qini"] > m / 2 and a["qini"] < -m / 2


def test_truth_metrics_and_sign_convention():
    X, t, y, p, q, dq = _hetero_log(0, n=3000)
    pred = 2.0 * dq + 1.0  # perfect ranking, wrong scale
    q_nan = q.copy()
    q_nan[:100, 3] = np.nan  # strategy 3 unavailable on 100 rows
    out = evaluate_uplift(pred, t, y, p, q_nan)
    assert out["n_treatments"] == 3 and out["n_rows"] == 3000 and out["weighted"] is True
    for j, r in out["per_treatment"].items():
        assert r["spearman"] == pytest.approx(1.0) and r["kendall"] == pytest.approx(1.0)
        assert r["calibration_slope"] == pytest.approx(0.5)
        assert r["calibration_intercept"] == pytest.approx(-0.5)
        assert len(r["calibration_deciles"]) == 10
        mp, mt = np.array(r["calibration_deciles"]).T
        np.testing.assert_allclose(mp, 2 * mt + 1)
        assert np.all(np.diff(mp) > 0)
        assert r["mae"] == pytest.approx(np.mean(np.abs(pred[:, j - 1] - dq[:, j - 1])[100 if j == 3 else 0:]))
        assert r["n_truth"] == (2900 if j == 3 else 3000)
        if j < 3:  # same ranking as the truth (for j=3 the oracle puts the rows without truth last)
            assert r["auuc_oracle"] == pytest.approx(r["auuc"])
        assert r["auuc"] > r["auuc_random"]
        assert r["n_treated"] + r["n_control"] == np.sum((t == 0) | (t == j))
    # predicting the loss with the wrong sign: anti-correlated and below random
    bad = evaluate_uplift(-dq, t, y, p, q)["per_treatment"][2]
    assert bad["spearman"] == pytest.approx(-1.0) and bad["auuc"] < bad["auuc_random"]


# --------------------------------------------------------------------------- IPW

def test_ipw_recovers_average_effect_where_naive_is_biased():
    rng = np.random.default_rng(7)
    n = 200_000
    x = rng.uniform(0, 1, n)
    p_treat = 0.2 + 0.6 * x  # confounded: likelier treated when y is larger
    treated = rng.random(n) < p_treat
    true_ate = -0.3
    y = 2.0 * x + true_ate * treated + rng.normal(0, 0.5, n)
    prop = np.where(treated, p_treat, 1 - p_treat)
    naive = average_uplift(treated, y)
    ipw = average_uplift(treated, y, prop)
    assert abs(ipw - true_ate) < 0.02
    assert abs(naive - true_ate) > 0.3  # bias 2 (E[x|t=1] - E[x|t=0]) = 0.4
    # the curve's end is that estimate, and evaluate_uplift reports it per treatment
    frac, up = uplift_curve(x, treated, y, prop)
    assert up[-1] / n == pytest.approx(ipw) and frac[-1] == 1.0
    r = evaluate_uplift(np.zeros((n, 1)), treated.astype(int), y, prop)["per_treatment"][1]
    assert r["uplift_mean"] == pytest.approx(ipw) and r["auuc_random"] == pytest.approx(ipw / 2)
    assert r["auuc"] == pytest.approx(r["auuc_random"])  # constant prediction = random


# --------------------------------------------------------------------------- input errors

def test_input_errors_name_expected_and_arrived():
    d, t, y, p = np.zeros((4, 3)), np.array([0, 1, 2, 3]), np.ones(4), np.full(4, 0.25)
    with pytest.raises(ValueError, match=r"y: expected shape \[n\] with n=4.*got \(3,\)"):
        evaluate_uplift(d, t, np.ones(3), p)
    with pytest.raises(ValueError, match=r"y: expected finite.*1 NaN.*row 2"):
        evaluate_uplift(d, t, np.array([1, 1, np.nan, 1]), p)
    with pytest.raises(ValueError, match=r"propensity: expected values in \(0, 1\].*row 1"):
        evaluate_uplift(d, t, y, np.array([0.25, 0.0, 0.25, 0.25]))
    with pytest.raises(ValueError, match=r"propensity: expected values in \(0, 1\]"):
        evaluate_uplift(d, t, y, np.array([0.25, 1.5, 0.25, 0.25]))
    with pytest.raises(ValueError, match=r"propensity: expected finite"):
        evaluate_uplift(d, t, y, np.array([0.25, np.nan, 0.25, 0.25]))
    with pytest.raises(ValueError, match=r"t: expected strategy ids in 0..3.*\[4\]"):
        evaluate_uplift(d, np.array([0, 1, 2, 4]), y, p)
    with pytest.raises(ValueError, match=r"none for t=2"):
        evaluate_uplift(d, np.array([0, 1, 1, 3]), y, p)
    with pytest.raises(ValueError, match=r"delta_q_hat: expected shape \[n, K\]"):
        evaluate_uplift(np.zeros(4), t, y, p)
    with pytest.raises(ValueError, match=r"q_true: expected shape \[n, K\+1\] = \(4, 4\), got \(4, 3\)"):
        evaluate_uplift(d, t, y, p, np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"treated: expected both treated and control"):
        uplift_curve([1.0, 2.0], [True, True], [0.0, 1.0])
    with pytest.raises(ValueError, match=r"treated: expected booleans or 0/1"):
        uplift_curve([1.0, 2.0], [0, 2], [0.0, 1.0])
    with pytest.raises(ValueError, match=r"tau_hat: expected finite"):
        auuc([np.nan, 2.0], [0, 1], [0.0, 1.0])


# --------------------------------------------------------------------------- baselines

def test_t_learner_recovers_heterogeneous_loss_and_constant_is_random():
    X, t, y, p, q, dq = _hetero_log(1, n=8000, noise=0.1)
    Xv, tv, yv, pv, qv, dqv = _hetero_log(2, n=8000, noise=0.1)
    tl = TLearner(max_iter=100, random_state=0, n_threads=1).fit(X, t, y, sample_weight=1 / p)
    Q = tl.predict(Xv)
    assert Q.shape == (8000, 4)
    d_hat = tl.predict_delta(Xv)
    np.testing.assert_allclose(d_hat, Q[:, :1] - Q[:, 1:])
    res_t = evaluate_uplift(d_hat, tv, yv, pv, qv)["per_treatment"]
    const = ConstantModel().fit(X, t, y, sample_weight=1 / p)
    np.testing.assert_allclose(const.arm_means_, [np.mean(y[t == a]) for a in range(4)])
    dc = const.predict_delta(Xv)
    assert dc.shape == (8000, 3) and np.all(dc == dc[0])
    res_c = evaluate_uplift(dc, tv, yv, pv, qv)["per_treatment"]
    for j in (1, 2, 3):
        assert res_t[j]["spearman"] > 0.5, res_t[j]
        assert res_t[j]["auuc"] > res_t[j]["auuc_random"]
        assert res_c[j]["auuc"] == pytest.approx(res_c[j]["auuc_random"], abs=1e-12)
        assert res_c[j]["qini"] == pytest.approx(0.0, abs=1e-12)
        assert np.isnan(res_c[j]["spearman"]) and np.isnan(res_c[j]["calibration_slope"])
    # seeded: a second fit predicts the same
    np.testing.assert_array_equal(TLearner(max_iter=100, random_state=0, n_threads=1).fit(X, t, y, 1 / p).predict(Xv[:50]), Q[:50])


def test_baselines_errors():
    X = np.zeros((6, 2))
    with pytest.raises(ValueError, match=r"none for arm\(s\) \[2\].*rows per arm: \{0: 2, 1: 2, 2: 0, 3: 2\}"):
        TLearner().fit(X, np.array([0, 0, 1, 1, 3, 3]), np.ones(6))
    with pytest.raises(ValueError, match=r"none for arm\(s\) \[3\]"):
        ConstantModel().fit(X, np.array([0, 0, 1, 1, 2, 2]), np.ones(6))
    with pytest.raises(ValueError, match=r"t: expected strategy ids in 0..3.*\[5\]"):
        TLearner().fit(X, np.array([0, 1, 2, 3, 5, 0]), np.ones(6))
    with pytest.raises(ValueError, match=r"y: expected shape \[n\] with n=6"):
        ConstantModel().fit(X, np.array([0, 1, 2, 3, 0, 1]), np.ones(5))
    from sklearn.exceptions import NotFittedError
    with pytest.raises(NotFittedError):
        TLearner().predict(X)
    m = ConstantModel().fit(X, np.array([0, 1, 2, 3, 0, 1]), np.arange(6.0))
    with pytest.raises(ValueError, match=r"X: expected shape \[n, 2\].*got \(3, 5\)"):
        m.predict(np.zeros((3, 5)))


# --------------------------------------------------------------------------- plot and report

def test_plot_and_report(tmp_path):
    X, t, y, p, q, dq = _hetero_log(3, n=3000)
    rng = np.random.default_rng(0)
    preds = {"oracle": dq, "noisy": dq + rng.normal(0, 0.1, dq.shape), "constant": np.zeros_like(dq)}
    curves = {m: treatment_curves(d, t, y, p) for m, d in preds.items()}
    assert set(curves["oracle"]) == {1, 2, 3}
    for kind in ("qini", "uplift"):
        path = plot_uplift_curves(curves, tmp_path / f"sub/{kind}.png", kind=kind)
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    metrics = {m: evaluate_uplift(d, t, y, p, q) for m, d in preds.items()}
    md = report_markdown(metrics, {"log": "synthetic", "seed": 3})
    for m in preds:
        assert f"| {m} |" in md
    for label in ("j=1 (reuse-retrieval)", "j=2 (reuse-prerank)", "j=3 (reuse-rank)"):
        assert label in md
    for title in ("## AUUC", "## Qini coefficient", "## Spearman", "| random |", "| oracle (true ΔQ) |",
                  "- seed: 3", "-ΔQ"):
        assert title in md
    with pytest.raises(ValueError, match="kind"):
        plot_uplift_curves(curves, tmp_path / "x.png", kind="roc")
