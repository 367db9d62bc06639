"""Uplift evaluation of effect-loss estimators (docs/method.md): curves, AUUC, Qini, rank and
calibration checks, a plot and a Markdown report.

Setting. Each repeated request i of a *randomised* log was served with a strategy
t_i in {0..K} (0 = full computation, j >= 1 = recycling strategy j) drawn with the logged
propensity p_i = P(t = t_i | request), and only the reward y_i (clicks) of that arm is observed.
An estimator predicts ΔQ̂_ij = Q̂_i0 - Q̂_ij, the effect *loss* of recycling request i with j.

Sign convention. The curves and areas here are the standard uplift ones (Gutierrez & Gérardy
2016; scikit-uplift's `uplift_curve` / `qini_curve`), computed for one treatment against the
control on the rows with t in {0, j}:

    uplift       τ_j = E[y | t = j] - E[y | t = 0] = -ΔQ_j   (usually negative: recycling loses)
    model score  τ̂_j = -ΔQ̂_j                               (rank the cheapest-to-recycle first)

so a useful estimator ranks requests that lose little (or even gain) first, its curve lies
above the random line, and AUUC > AUUC_random, Qini > 0.

Curves (rows sorted by τ̂ descending, top-k = first k rows; with IPW weights
w_i = (1/p_i) / mean(1/p) over the rows evaluated, so that equal propensities give w = 1):

    W_t(k), W_c(k)  weight of treated / control rows in the top k; W(k) = W_t(k) + W_c(k)
    Y_t(k), Y_c(k)  weighted reward sums of treated / control rows in the top k
    fraction(k)     = W(k) / W(n)                                   (= k / n unweighted)
    uplift(k)       = (Y_t(k)/W_t(k) - Y_c(k)/W_c(k)) · W(k)        (= (ȳ_t - ȳ_c) · k)
    qini(k)         = Y_t(k) - Y_c(k) · W_t(k) / W_c(k)
    (a mean over an empty group counts as 0, and W_t/W_c with W_c = 0 as 0, as in scikit-uplift)

Ties in τ̂ are grouped as scikit-uplift does: the curve is evaluated exactly at the end of each
group of equal scores and linearly interpolated inside the group, so the result does not depend
on row order, matches scikit-uplift's points at the group ends, and a constant score gives
exactly the random line.

Areas (trapezoid rule over fraction in [0, 1], divided by n = number of rows evaluated, so the
unit is "reward per request" and the values are comparable across models and log sizes):

    auuc          = ∫ uplift(f) df / n           auuc_random = uplift(n) / (2n) = τ̂_ATE / 2
    qini          = (∫ qini(f) df - qini(n) / 2) / n     (area between the Qini curve and the
                    straight line from (0, 0) to (1, qini(n)); 0 for a random ranking)
    uplift_mean   = uplift(n) / n  (the Hajek / IPW estimate of τ_j when propensities are given)
"""
from __future__ import annotations

import math
import warnings

import numpy as np
from ..errors import UserError

STRATEGY_NAMES = {0: "full", 1: "reuse-retrieval", 2: "reuse-prerank", 3: "reuse-rank"}

SIGN_CONVENTION = ("uplift of treatment j is τ_j = E[y|t=j] - E[y|t=0] = -ΔQ_j and the model's "
                   "score is -ΔQ̂_j, so a good model has AUUC above random and Qini above 0")


# --------------------------------------------------------------------------- input checks

def _vector(name: str, a, n: int | None = None, *, what: str = "") -> np.ndarray:
    """A finite float64 vector [n]; a clear ValueError otherwise."""
    arr = np.asarray(a)
    want = f"[n] with n={n}{what}" if n is not None else "[n]"
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        raise UserError(f"{name}: expected shape {want}, got {tuple(arr.shape)}")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.number)):
        raise UserError(f"{name}: expected numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise UserError(f"{name}: expected finite values, got {int(bad.sum())} NaN/inf value(s) "
                         f"(first at row {int(np.flatnonzero(bad)[0])})")
    return arr


def _treated(treated, n: int) -> np.ndarray:
    arr = np.asarray(treated)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise UserError(f"treated: expected shape [n] with n={n} (length of tau_hat), got {tuple(arr.shape)}")
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.number) or not np.isin(arr, (0, 1)).all():
            raise UserError(f"treated: expected booleans or 0/1, got dtype {arr.dtype} with values "
                             f"{np.unique(arr)[:5].tolist()}")
        arr = arr.astype(bool)
    return arr


def _propensity(propensity, n: int, what: str = "") -> np.ndarray | None:
    if propensity is None:
        return None
    p = _vector("propensity", propensity, n, what=what)
    bad = (p <= 0) | (p > 1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(f"propensity: expected values in (0, 1], got {int(bad.sum())} outside "
                         f"(first at row {i}: {p[i]!r}; min {p.min()!r}, max {p.max()!r})")
    return p


def _ipw(p: np.ndarray | None, n: int) -> np.ndarray:
    """IPW weights 1/p normalised to mean 1 over the rows given (ones without propensities)."""
    if p is None:
        return np.ones(n)
    w = 1.0 / p
    return w / w.mean()


def _check_groups(treated: np.ndarray) -> None:
    nt = int(treated.sum())
    if nt == 0 or nt == treated.size:
        raise UserError(f"treated: expected both treated and control rows, got {nt} treated and "
                         f"{treated.size - nt} control")


# --------------------------------------------------------------------------- curves and areas

def _curves(score: np.ndarray, treated: np.ndarray, y: np.ndarray, w: np.ndarray):
    """score, y, w float64 [n]; treated bool [n]. Returns fraction, uplift, qini, each [n+1]."""
    n = score.size
    order = np.argsort(-score, kind="stable")
    s, tr, ww = score[order], treated[order], w[order]
    wy = ww * y[order]
    zero = np.zeros(1)
    wt = np.concatenate((zero, np.cumsum(np.where(tr, ww, 0.0))))
    wc = np.concatenate((zero, np.cumsum(np.where(tr, 0.0, ww))))
    yt = np.concatenate((zero, np.cumsum(np.where(tr, wy, 0.0))))
    yc = np.concatenate((zero, np.cumsum(np.where(tr, 0.0, wy))))
    # group ends: k such that the k-th and (k+1)-th sorted scores differ, plus 0 and n
    b = np.concatenate(([0], np.flatnonzero(s[1:] != s[:-1]) + 1, [n]))
    wt, wc, yt, yc = wt[b], wc[b], yt[b], yc[b]
    mean_t = np.divide(yt, wt, out=np.zeros_like(yt), where=wt > 0)
    mean_c = np.divide(yc, wc, out=np.zeros_like(yc), where=wc > 0)
    total = wt + wc
    uplift = (mean_t - mean_c) * total
    qini = yt - np.divide(yc * wt, wc, out=np.zeros_like(yc), where=wc > 0)
    frac = total / total[-1]
    k = np.arange(n + 1)
    return np.interp(k, b, frac), np.interp(k, b, uplift), np.interp(k, b, qini)


def _area(x: np.ndarray, v: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (v[1:] + v[:-1])) / 2.0)


def _prepare(tau_hat, treated, y, propensity):
    tau = _vector("tau_hat", tau_hat)
    n = tau.size
    if n == 0:
        raise UserError("tau_hat: expected at least one row, got 0")
    tr = _treated(treated, n)
    _check_groups(tr)
    yy = _vector("y", y, n, what=" (length of tau_hat)")
    w = _ipw(_propensity(propensity, n, what=" (length of tau_hat)"), n)
    return tau, tr, yy, w


def uplift_curve(tau_hat, treated, y, propensity=None) -> tuple[np.ndarray, np.ndarray]:
    """Uplift curve of one treatment vs control.

    tau_hat [n] predicted uplift (higher = target first); treated [n] bool (False = control);
    y [n] observed reward; propensity [n] in (0, 1] or None (probability of the arm each row got).
    Returns fraction_targeted [n+1] (0 .. 1) and cumulative_uplift [n+1] =
    (weighted mean y of treated - of control, in the top k) · W(k); see the module docstring.
    """
    tau, tr, yy, w = _prepare(tau_hat, treated, y, propensity)
    frac, up, _ = _curves(tau, tr, yy, w)
    return frac, up


def qini_curve(tau_hat, treated, y, propensity=None) -> tuple[np.ndarray, np.ndarray]:
    """Qini curve of one treatment vs control (same inputs as `uplift_curve`).

    Returns fraction_targeted [n+1] and qini [n+1] = Y_t(k) - Y_c(k) · W_t(k) / W_c(k).
    """
    tau, tr, yy, w = _prepare(tau_hat, treated, y, propensity)
    frac, _, qn = _curves(tau, tr, yy, w)
    return frac, qn


def auuc(tau_hat, treated, y, propensity=None) -> float:
    """Area under the uplift curve over fraction targeted in [0, 1], divided by n (reward per
    request). Compare with `auuc_random` (same rows): above it = better than random targeting."""
    frac, up = uplift_curve(tau_hat, treated, y, propensity)
    return _area(frac, up) / (frac.size - 1)


def auuc_random(treated, y, propensity=None) -> float:
    """AUUC of a random ranking: the area under the straight line to the curve's end,
    uplift(n) / (2n) = (estimated average uplift) / 2. treated, y, propensity: [n]."""
    return average_uplift(treated, y, propensity) / 2.0


def average_uplift(treated, y, propensity=None) -> float:
    """Estimated average uplift E[y | treated] - E[y | control] = uplift(n) / n: the difference
    of (IPW, self-normalised / Hajek) weighted means. treated, y, propensity: [n]."""
    arr = np.asarray(treated)
    if arr.ndim != 1 or arr.shape[0] == 0:
        raise UserError(f"treated: expected shape [n] with n >= 1, got {tuple(arr.shape)}")
    n = arr.shape[0]
    tr = _treated(arr, n)
    _check_groups(tr)
    yy = _vector("y", y, n, what=" (length of treated)")
    w = _ipw(_propensity(propensity, n, what=" (length of treated)"), n)
    return float(np.sum(w * yy * tr) / np.sum(w * tr) - np.sum(w * yy * ~tr) / np.sum(w * ~tr))


def qini_coefficient(tau_hat, treated, y, propensity=None) -> float:
    """Qini coefficient: area between the Qini curve and the random line (from (0, 0) to
    (1, qini(n))) over fraction targeted in [0, 1], divided by n. 0 for a random ranking."""
    frac, qn = qini_curve(tau_hat, treated, y, propensity)
    return (_area(frac, qn) - qn[-1] / 2.0) / (frac.size - 1)


# --------------------------------------------------------------------------- per-treatment evaluation

def strategy_ids(t: np.ndarray, k: int, k_note: str) -> np.ndarray:
    """Integer strategy ids in 0..k as int64, or a ValueError naming what arrived."""
    if not np.issubdtype(t.dtype, np.integer):
        if not np.issubdtype(t.dtype, np.floating) or not np.isfinite(t).all() or (t != np.round(t)).any():
            raise UserError(f"t: expected integer strategy ids, got dtype {t.dtype}")
    t = t.astype(np.int64)
    out = (t < 0) | (t > k)
    if out.any():
        raise UserError(f"t: expected strategy ids in 0..{k} ({k_note}), "
                         f"got {np.unique(t[out]).tolist()[:10]} in {int(out.sum())} row(s)")
    return t


def _prepare_arms(delta_q_hat, t, y, propensity, q_true):
    d = np.asarray(delta_q_hat)
    if d.ndim != 2 or d.shape[1] < 1 or d.shape[0] < 1:
        raise UserError(f"delta_q_hat: expected shape [n, K] (n >= 1 requests, K >= 1 treatments), "
                         f"got {tuple(d.shape)}")
    n, k = d.shape
    if not np.issubdtype(d.dtype, np.number) or d.dtype == bool:
        raise UserError(f"delta_q_hat: expected numbers, got dtype {d.dtype}")
    d = d.astype(np.float64, copy=False)
    bad = ~np.isfinite(d)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise UserError(f"delta_q_hat: expected finite predictions, got {int(bad.sum())} NaN/inf "
                         f"(first at row {i}, treatment {j + 1})")
    tt = np.asarray(t)
    if tt.ndim != 1 or tt.shape[0] != n:
        raise UserError(f"t: expected shape [n] with n={n} (rows of delta_q_hat), got {tuple(tt.shape)}")
    tt = strategy_ids(tt, k, f"K={k} from delta_q_hat.shape[1]")
    yy = _vector("y", y, n, what=" (rows of delta_q_hat)")
    p = _propensity(propensity, n, what=" (rows of delta_q_hat)")
    q = None
    if q_true is not None:
        q = np.asarray(q_true)
        if q.ndim != 2 or q.shape != (n, k + 1):
            raise UserError(f"q_true: expected shape [n, K+1] = ({n}, {k + 1}), got {tuple(q.shape)}")
        q = q.astype(np.float64, copy=False)
        if np.isinf(q).any():
            raise UserError("q_true: expected finite values or NaN (strategy unavailable), got inf")
    return d, tt, yy, p, q


def _arm_rows(t: np.ndarray, j: int, k: int) -> np.ndarray:
    counts = np.bincount(t, minlength=k + 1)
    if counts[0] == 0 or counts[j] == 0:
        arm = 0 if counts[0] == 0 else j
        raise UserError(f"t: expected rows for control (t=0) and treatment t={j}, got none for t={arm}; "
                         f"rows per arm: {dict(enumerate(counts.tolist()))}")
    return (t == 0) | (t == j)


def treatment_curves(delta_q_hat, t, y, propensity=None) -> dict[int, dict[str, np.ndarray]]:
    """Uplift and Qini curves of each treatment j = 1..K against control, with the score -ΔQ̂_j.

    delta_q_hat [n, K] predicted loss ΔQ̂_ij; t [n] int in 0..K; y [n]; propensity [n] or None.
    Returns {j: {"fraction": [m+1], "uplift": [m+1], "qini": [m+1]}} with m the number of rows
    with t in {0, j}; input for `plot_uplift_curves`.
    """
    d, tt, yy, p, _ = _prepare_arms(delta_q_hat, t, y, propensity, None)
    out = {}
    for j in range(1, d.shape[1] + 1):
        m = _arm_rows(tt, j, d.shape[1])
        frac, up, qn = _curves(-d[m, j - 1], tt[m] == j, yy[m], _ipw(None if p is None else p[m], int(m.sum())))
        out[j] = {"fraction": frac, "uplift": up, "qini": qn}
    return out


def _spearman_kendall(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    from scipy import stats

    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan, math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = stats.spearmanr(a, b)[0]
        tau = stats.kendalltau(a, b)[0]
    return float(rho), float(tau)


def _truth_metrics(pred: np.ndarray, true: np.ndarray, n_bins: int) -> dict:
    """pred, true [n] (true may hold NaN: ignored). Rank and calibration of predicted vs true ΔQ."""
    ok = np.isfinite(true)
    pred, true = pred[ok], true[ok]
    m = pred.size
    res = {"n_truth": int(m), "spearman": math.nan, "kendall": math.nan, "calibration_deciles": [],
           "calibration_slope": math.nan, "calibration_intercept": math.nan, "mae": math.nan,
           "mean_pred": math.nan, "mean_true": math.nan}
    if m == 0:
        return res
    res["spearman"], res["kendall"] = _spearman_kendall(pred, true)
    bins = min(n_bins, m)
    idx = np.empty(m, np.int64)
    idx[np.argsort(pred, kind="stable")] = (np.arange(m) * bins) // m
    cnt = np.bincount(idx, minlength=bins)
    mp = np.bincount(idx, pred, bins) / cnt
    mt = np.bincount(idx, true, bins) / cnt
    res["calibration_deciles"] = [[float(a), float(b)] for a, b in zip(mp, mt)]
    if np.ptp(pred) > 1e-12 * max(1.0, float(np.abs(pred).max())):  # else constant: slope undefined
        slope = float(np.mean((pred - pred.mean()) * (true - true.mean())) / np.var(pred))
        res["calibration_slope"] = slope
        res["calibration_intercept"] = float(true.mean() - slope * pred.mean())
    res["mae"] = float(np.mean(np.abs(pred - true)))
    res["mean_pred"], res["mean_true"] = float(pred.mean()), float(true.mean())
    return res


def evaluate_uplift(delta_q_hat, t, y, propensity=None, q_true=None, *, n_bins: int = 10) -> dict:
    """Evaluate predicted effect losses on a randomised log, per treatment j = 1..K vs control.

    delta_q_hat [n, K] float  predicted loss ΔQ̂_ij = Q̂_i0 - Q̂_ij of recycling request i with j
    t           [n] int       logged strategy in 0..K (0 = full computation = control)
    y           [n] float     observed reward (clicks) of the logged strategy
    propensity  [n] or None   probability the logged strategy had, in (0, 1]; None = unweighted
    q_true      [n, K+1] or None  ground-truth expected reward q_i0..q_iK (NaN = unavailable)

    Pass repeated requests only. Uplift metrics use the rows with t in {0, j}, the uplift
    τ_j = E[y|t=j] - E[y|t=0] = -ΔQ_j and the score -ΔQ̂_j (see the module docstring); the truth
    metrics use every row where q_0 and q_j are finite (the truth does not depend on the arm
    logged). Returns a JSON-friendly dict:

        {"per_treatment": {j: {
            "n_treated", "n_control",           rows with t=j / t=0
            "uplift_mean",                      estimated τ_j = uplift(n)/n (IPW/Hajek if weighted)
            "auuc", "auuc_random",              area under the uplift curve / n, and random's
            "qini", "qini_area", "qini_random_area",   qini = qini_area - qini_random_area
          and with q_true:
            "auuc_oracle", "qini_oracle",       same metrics for the score -ΔQ_true on the same rows
            "spearman", "kendall",              rank correlation of ΔQ̂_j with true ΔQ_j = q_0 - q_j
            "calibration_deciles",              [[mean ΔQ̂, mean true ΔQ]] in n_bins bins of ΔQ̂
            "calibration_slope", "calibration_intercept",  OLS true ΔQ = a + b · ΔQ̂ (NaN if ΔQ̂ constant)
            "mae", "mean_pred", "mean_true", "n_truth"}},
         "n_rows", "n_treatments", "weighted", "sign_convention"}
    """
    d, tt, yy, p, q = _prepare_arms(delta_q_hat, t, y, propensity, q_true)
    n, k = d.shape
    per: dict[int, dict] = {}
    for j in range(1, k + 1):
        m = _arm_rows(tt, j, k)
        rows = int(m.sum())
        treated = tt[m] == j
        w = _ipw(None if p is None else p[m], rows)
        frac, up, qn = _curves(-d[m, j - 1], treated, yy[m], w)
        res = {"n_treated": int(treated.sum()), "n_control": int(rows - treated.sum()),
               "uplift_mean": float(up[-1] / rows),
               "auuc": _area(frac, up) / rows, "auuc_random": float(up[-1] / (2 * rows))}
        res["qini_area"] = _area(frac, qn) / rows
        res["qini_random_area"] = float(qn[-1] / (2 * rows))
        res["qini"] = res["qini_area"] - res["qini_random_area"]
        if q is not None:
            true_d = q[:, 0] - q[:, j]
            oracle = -true_d[m]
            oracle[~np.isfinite(oracle)] = -np.inf  # rows without truth: ranked last, as one tie group
            ofrac, oup, oqn = _curves(oracle, treated, yy[m], w)
            res["auuc_oracle"] = _area(ofrac, oup) / rows
            res["qini_oracle"] = (_area(ofrac, oqn) - oqn[-1] / 2.0) / rows
            res.update(_truth_metrics(d[:, j - 1], true_d, n_bins))
        per[j] = res
    return {"per_treatment": per, "n_rows": int(n), "n_treatments": int(k),
            "weighted": p is not None, "sign_convention": SIGN_CONVENTION}


# --------------------------------------------------------------------------- plot and report
