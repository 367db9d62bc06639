"""λ certified off-policy: the deployed rule's loss, estimated doubly robustly on a held-out log.

The estimator's own predicted loss is not what a budget should be checked against: a model that
is slightly optimistic on many requests spends the budget many times over. Here λ is chosen on
an off-policy estimate of the loss that the *deployed rule* (the argmin of c_j + λ ΔQ̂_ij, or
for ω > 0 the argmax of / a draw from the simplex projection) realises on a randomised log the
estimator was not trained on.

Notation (arrays, n logged requests, strategies 0..K):
    q̂      [n, K+1]  the estimator's predicted effect per strategy (the DR control variate)
    x       [n, K+1]  the rule's allocation (one-hot for a deterministic rule)
    t, p, r [n]       logged strategy, its propensity, the reward (clicks or an unbiased
                      lower-noise label, estimator/labels.py)

Per request, the doubly robust estimates of Q_i0 (always full) and of Q_i0 − Q_iπ:

    v_i = q̂_i0 + 1[t_i = 0]/p_i · (r_i − q̂_i0)                          (initial requests: r_i)
    d_i = Σ_j x_ij (q̂_i0 − q̂_ij) + (1[t_i = 0] − x_i,t_i)/p_i · (r_i − q̂_i,t_i)

Both are unbiased for any q̂ that does not depend on the row's own outcome (hence cross-fitting:
the rows scored here must not be rows the estimator was trained on). d_i = 0 where the rule
serves the full cascade. Effect loss L = Σ d / Σ v; its standard error is the delta-method
(linearised ratio) error with requests clustered by session, since a session's requests share
a user and a cache. One-sided upper bound at confidence γ: L + z_γ · se.

λ: the rule is evaluated on a grid of λ (quantiles of the points where some request changes
its choice), and the chosen λ is the smallest whose bound, and the bound of every larger grid
λ, stays within the budget. Requiring it of every larger λ keeps the choice off a lucky dip of a
noisy curve. With a loss floor on ΔQ̂ (policy.decide.policy_dq) the largest grid λ serves every
request in full, so some λ always qualifies; but on a small log it may recycle next to nothing.
The noise floor (noise_floor) says from which budget on the log can certify a rule whose loss
stands out of its noise; `solve` warns below it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from statistics import NormalDist

import numpy as np

from .solver import SolverError, check_inputs, project_simplex

DEFAULT_GRID = 256
# the least loss a recycled request is counted with (policy.decide.policy_dq's loss_floor), as a
# share of the mean predicted effect of a repeated request: a large λ then serves all in full
LOSS_FLOOR_SHARE = 1e-3


@dataclass
class LossCurve:
    """The deployed rule along the λ grid. All arrays [m]."""
    lam: np.ndarray
    loss_pct: np.ndarray  # DR estimate of the relative effect loss, %
    se_pct: np.ndarray  # its session-clustered standard error, %
    saved_pct: np.ndarray  # compute saved, % of always-full compute (estimator's cost included)
    recycled: np.ndarray  # share of repeated requests not given the full cascade


@dataclass
class Certification:
    lam: float
    certified: bool
    budget: float  # relative, e.g. 0.01
    confidence: float
    z: float
    loss_pct: float  # DR point estimate at the chosen λ
    se_pct: float
    ci_pct: tuple[float, float]  # two-sided interval at `confidence` (its upper end is the bound)
    bound_pct: float  # the one-sided upper bound that meets the budget
    saved_pct: float
    strategy_mix: dict  # over repeated requests
    floor_pct: float  # the noise floor: the smallest budget this log can certify with a visible loss (noise_floor)
    requests: int
    repeated: int
    sessions: int
    curve: LossCurve = field(repr=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("curve")
        d["ci_pct"] = list(self.ci_pct)
        d["floor_pct"] = self.floor_pct if np.isfinite(self.floor_pct) else None  # JSON has no inf
        d["below_noise_floor"] = bool(100 * self.budget < self.floor_pct)
        d["method"] = "doubly robust, session-clustered delta-method interval"
        return d


def z_of(confidence: float) -> float:
    """One-sided normal quantile; confidence 0.5 -> 0 (the point estimate meets the budget)."""
    if not np.isfinite(confidence) or not 0.5 <= confidence < 1:
        raise SolverError(f"confidence: expected a level in [0.5, 1) (0.95 = a 95% upper bound), got {confidence:g}")
    return float(NormalDist().inv_cdf(confidence))


def interval_label(confidence: float) -> str:
    """What Certification.ci_pct is: the two-sided 95% interval for the point estimate, else
    the two-sided interval whose upper end is the one-sided bound (90% for a 95% bound)."""
    if confidence == 0.5:
        return "95% interval"
    return f"{2 * confidence - 1:.0%} interval, its upper end the {confidence:.0%} bound"


def rule_allocation(costs: np.ndarray, dq: np.ndarray, avail: np.ndarray, lam: float, omega: float = 0.0,
                    choice: str = "argmax") -> np.ndarray:
    """What the deployed rule does with λ (policy.decide.decide): the chosen strategy [n] of a
    deterministic rule, or for choice 'sample' (ω > 0) the distribution [n, K+1] it draws from
    (the DR estimate is then the expectation over its draws)."""
    score = costs[None, :] + lam * np.where(avail, dq, 0.0)
    if omega > 0:
        x = project_simplex(-score / omega, avail)
        return x if choice == "sample" else np.argmax(x, axis=1)
    return np.argmin(np.where(avail, score, np.inf), axis=1)


def lambda_grid(costs: np.ndarray, dq: np.ndarray, avail: np.ndarray, size: int = DEFAULT_GRID) -> np.ndarray:
    """[m <= size] increasing λ >= 0: 0, then quantiles and a log-spaced range of the λ at which
    some request switches between two available strategies (c_j + λ ΔQ̂_j = c_k + λ ΔQ̂_k with
    c_j > c_k, ΔQ̂_j < ΔQ̂_k), then one beyond the last switch (the most conservative rule)."""
    pts = []
    k1 = len(costs)
    for j in range(k1):
        for k in range(j + 1, k1):
            dc = costs[j] - costs[k]
            dd = dq[:, k] - dq[:, j]
            ok = avail[:, j] & avail[:, k] & (dd > 0) & (dc > 0)
            if ok.any():
                pts.append(dc / dd[ok])
    if not pts:
        return np.array([0.0])
    pts = np.concatenate(pts)
    pts = pts[np.isfinite(pts)]
    if pts.size == 0:
        return np.array([0.0])
    # half at quantiles (where most requests switch), half log-spaced (the long tail of requests
    # that switch late: the last ones recycled, which a tight budget is about)
    m = max(2, (size - 2) // 2)
    qs = np.quantile(pts, np.linspace(0.0, 1.0, m))
    lo = max(float(np.quantile(pts, 0.001)), 1e-12)
    geo = np.geomspace(lo, max(lo, float(pts.max())), m)
    return np.unique(np.concatenate([[0.0], qs, geo, [pts.max() * 1.01 + 1e-12]]))


def _dr_terms(x: np.ndarray, q_hat: np.ndarray, t: np.ndarray, w: np.ndarray, res: np.ndarray) -> np.ndarray:
    """d [n]: DR estimate of Q_i0 − Q_iπ (module docstring); res = r − q̂_t, w = 1/p.
    x: the allocation [n, K+1], or the chosen strategy [n] of a deterministic rule."""
    rows = np.arange(len(t))
    if x.ndim == 1:
        direct = q_hat[:, 0] - q_hat[rows, x]
        on_t = (x == t).astype(np.float64)
    else:
        direct = (x * (q_hat[:, :1] - q_hat)).sum(axis=1)
        on_t = x[rows, t]
    return direct + ((t == 0) - on_t) * w * res


def _clustered(d: np.ndarray, v: np.ndarray, session: np.ndarray, n_sessions: int) -> tuple[float, float]:
    """(L = Σd/Σv, its session-clustered delta-method standard error)."""
    V = v.sum()
    L = d.sum() / V
    z = np.bincount(session, weights=d - L * v, minlength=n_sessions)
    s = max(1, n_sessions)
    var = (z @ z) * s / max(1, s - 1) / V ** 2
    return float(L), float(np.sqrt(var))


def _envelope_events(c: np.ndarray, d: np.ndarray, a: np.ndarray):
    """The rule argmin_j c_j + λ d_ij (ties to the lower id) as λ grows from 0, per row: the
    choice at λ = 0 [n] and the switches (row, key, from, to), at most K per row. A switch
    applies at every grid λ >= key: its key is the crossing, moved up by one float where the
    tie at the crossing itself still goes to the old, lower id."""
    n, k1 = d.shape
    rows = np.arange(n)
    cur = np.argmin(np.where(a, c[None, :], np.inf), axis=1)
    lam_cur = np.zeros(n)
    ev = []
    live = np.ones(n, bool)
    for _ in range(k1 - 1):
        dc = d[rows, cur][:, None]
        cc = c[cur][:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            cross = (c[None, :] - cc) / (dc - d)
        ok = a & (d < dc) & live[:, None]
        cross = np.where(ok, np.maximum(cross, lam_cur[:, None]), np.inf)
        # the next line of the envelope: the earliest crossing; among equal ones the flattest
        first = cross.min(axis=1)
        tie = cross == first[:, None]
        nxt = np.argmin(np.where(tie, d, np.inf), axis=1)
        go = np.isfinite(first)
        if not go.any():
            break
        r = rows[go]
        frm, to, lam = cur[go], nxt[go], first[go]
        key = np.where(to < frm, lam, np.nextafter(lam, np.inf))
        ev.append((r, key, frm, to))
        cur = cur.copy()
        cur[go] = nxt[go]
        lam_cur[go] = first[go]
        live &= go
    if not ev:
        z = np.zeros(0, np.int64)
        return np.argmin(np.where(a, c[None, :], np.inf), axis=1), z, np.zeros(0), z, z
    r, key, frm, to = (np.concatenate(x) for x in zip(*ev))
    o = np.argsort(key, kind="stable")
    start = np.argmin(np.where(a, c[None, :], np.inf), axis=1)
    return start, r[o], key[o], frm[o], to[o]


def _argmin_path(c, d, a, qh, t, w, res, v, sess_rep, sess, n_sess, lams, base_cost, n):
    """The grid evaluation of the ω = 0 rule in one pass over its switches (_envelope_events),
    keeping per-session sums: O(n log n) instead of a full argmin per grid λ. Same numbers as
    evaluating rule_allocation at every λ (tests/unit/test_certify.py)."""
    n_r, k1 = d.shape
    rows = np.arange(n_r)
    direct = qh[:, :1] - qh  # [n_r, K+1] q̂_0 − q̂_j
    corr = ((t == 0)[:, None].astype(np.float64) - (t[:, None] == np.arange(k1)[None, :])) * (w * res)[:, None]
    dmat = direct + corr  # d_i(j): the DR term if request i gets strategy j
    start, er, ekey, efrm, eto = _envelope_events(c, d, a)
    V_s = np.bincount(sess, weights=v, minlength=n_sess)
    D_s = np.bincount(sess_rep, weights=dmat[rows, start], minlength=n_sess)
    V = V_s.sum()
    A, B, C = float(D_s @ D_s), float(D_s @ V_s), float(V_s @ V_s)
    counts = np.bincount(start, minlength=k1).astype(np.float64)
    e_sess = sess_rep[er]
    e_dd = dmat[er, eto] - dmat[er, efrm]
    pos = 0
    out = ([], [], [], [], [])
    S = max(1, n_sess)
    for lam in lams:
        end = int(np.searchsorted(ekey, lam, side="right"))
        if end > pos:
            s_aff = np.unique(e_sess[pos:end])
            A -= float(D_s[s_aff] @ D_s[s_aff])
            B -= float(D_s[s_aff] @ V_s[s_aff])
            np.add.at(D_s, e_sess[pos:end], e_dd[pos:end])
            A += float(D_s[s_aff] @ D_s[s_aff])
            B += float(D_s[s_aff] @ V_s[s_aff])
            counts += np.bincount(eto[pos:end], minlength=k1) - np.bincount(efrm[pos:end], minlength=k1)
            pos = end
        D = float(D_s.sum())
        L = D / V
        var = max(0.0, A - 2 * L * B + L * L * C) * S / max(1, S - 1) / V ** 2
        mix = counts / n_r
        out[0].append(100 * L)
        out[1].append(100 * np.sqrt(var))
        out[2].append(100 * (1 - (base_cost + n_r * (mix @ c)) / (c[0] * n)))
        out[3].append(float(1 - mix[0]))
        out[4].append(mix)
    return out


def noise_floor(curve: LossCurve, z: float) -> float:
    """The smallest budget (%) this log can certify with a loss it can see. Along the grid from
    λ = 0 (most recycling) upwards, the rules whose estimated loss L stays above their margin
    z'·se (z' = z, or the 95% one-sided z for the point estimate); the floor is the bound
    L + z'·se of the last of them. Below it, every rule has a loss lost in its own noise, so
    the certified rule recycles little. inf when even λ = 0's loss does not stand out."""
    zf = z if z > 0 else float(NormalDist().inv_cdf(0.95))
    margin = zf * curve.se_pct
    seen = (curve.loss_pct > margin) & (margin > 0)
    if not seen[0]:
        return float("inf")
    last = len(seen) - 1 if seen.all() else int(np.argmin(seen)) - 1
    return float(curve.loss_pct[last] + margin[last])


def certify_lambda(costs, dq, available, q_hat, t, p, r, session, is_repeat, budget: float,
                   confidence: float = 0.5, omega: float = 0.0, choice: str = "argmax",
                   estimator_cost: float = 0.0, grid: int = DEFAULT_GRID) -> Certification:
    """λ whose deployed rule's DR loss bound (module docstring) meets `budget` on this log.

    costs [K+1]; dq [n, K] or [n, K+1] (the policy's ΔQ̂, policy.decide.policy_dq); available
    [n, K+1]; q_hat [n, K+1]; t, p, r, session (any ids), is_repeat [n]. Initial requests are
    always served in full and only enter the denominator."""
    c, d_all, a_all = check_inputs(costs, dq, available)
    if not 0 <= budget < 1:
        raise SolverError(f"budget: expected a relative effect loss in [0, 1), got {budget:g}")
    z = z_of(confidence)
    rep = np.asarray(is_repeat, bool)
    t = np.asarray(t, np.int64)
    p = np.asarray(p, np.float64)
    r = np.asarray(r, np.float64)
    q_hat = np.asarray(q_hat, np.float64)
    n = len(t)
    if not (len(p) == len(r) == len(rep) == len(session) == n == len(d_all) == len(q_hat)):
        raise SolverError("certify: expected arrays of one length n for dq, available, q_hat, t, p, r, session, "
                          f"is_repeat; got {[len(v) for v in (d_all, a_all, q_hat, t, p, r, session, rep)]}")
    if n == 0 or not rep.any():
        raise SolverError("certify: the log has no repeated requests, nothing to decide")
    if not ((p > 0) & (p <= 1)).all():
        raise SolverError("certify: propensities must be in (0, 1]")
    if not np.isfinite(q_hat[rep]).all() or not np.isfinite(r).all():
        raise SolverError("certify: predicted effects and rewards must be finite")
    if ((t < 0) | (t >= len(c))).any():
        raise SolverError(f"certify: logged strategies must be in 0..{len(c) - 1}")
    _, sess = np.unique(np.asarray(session), return_inverse=True)
    n_sess = int(sess.max()) + 1
    # repeated rows decide; the initial ones only add their reward to the full value
    d, a, qh, tr = d_all[rep], a_all[rep], q_hat[rep], t[rep]
    w = 1.0 / p[rep]
    res = r[rep] - qh[np.arange(len(tr)), tr]
    v = np.zeros(n)
    v[~rep] = r[~rep]
    v[rep] = qh[:, 0] + (tr == 0) * w * res
    if v.sum() <= 0:
        raise SolverError(f"certify: the estimated value of the full cascade is {v.sum():.4g} <= 0; "
                          "the log's rewards cannot carry a relative loss")
    lams = lambda_grid(c, d, a, grid)
    n_rep = int(rep.sum())
    base_cost = (~rep).sum() * c[0] + estimator_cost * n_rep
    if omega > 0:
        loss, se, saved, recycled, mixes = [], [], [], [], []
        drow = np.zeros(n)
        for lam in lams:
            x = rule_allocation(c, d, a, float(lam), omega, choice)
            drow[rep] = _dr_terms(x, qh, tr, w, res)
            L, s = _clustered(drow, v, sess, n_sess)
            loss.append(100 * L)
            se.append(100 * s)
            mix = (np.bincount(x, minlength=len(c)) / len(x)) if x.ndim == 1 else x.mean(axis=0)
            saved.append(100 * (1 - (base_cost + len(x) * (mix @ c)) / (c[0] * n)))
            recycled.append(float(1 - mix[0]))
            mixes.append(mix)
    else:
        loss, se, saved, recycled, mixes = _argmin_path(c, d, a, qh, tr, w, res, v, sess[rep], sess, n_sess,
                                                        lams, base_cost, n)
    curve = LossCurve(lams, np.array(loss), np.array(se), np.array(saved), np.array(recycled))
    bound = curve.loss_pct + z * curve.se_pct
    envelope = np.maximum.accumulate(bound[::-1])[::-1]  # max over this and every larger λ
    ok = np.flatnonzero(envelope <= 100 * budget + 1e-12)
    certified = ok.size > 0
    k = int(ok[0]) if certified else len(lams) - 1
    zc = z if z > 0 else float(NormalDist().inv_cdf(0.975))  # point estimate: report a 95% interval
    mix = {str(j): float(m) for j, m in enumerate(mixes[k])}
    return Certification(lam=float(lams[k]), certified=certified, budget=float(budget), confidence=float(confidence),
                         z=z, loss_pct=float(curve.loss_pct[k]), se_pct=float(curve.se_pct[k]),
                         ci_pct=(float(curve.loss_pct[k] - zc * curve.se_pct[k]),
                                 float(curve.loss_pct[k] + zc * curve.se_pct[k])),
                         bound_pct=float(bound[k]), saved_pct=float(curve.saved_pct[k]), strategy_mix=mix,
                         floor_pct=noise_floor(curve, z), requests=n, repeated=n_rep, sessions=n_sess,
                         curve=curve)


def certify_families(costs, dq, available, q_hat, t, p, r, session, is_repeat, budget: float, families=None,
                     **options) -> tuple[list[int] | None, Certification, list]:
    """certify_lambda for each family of rules (a list of the strategy ids the rule may use, or
    None for all) and the one to deploy: certified, then the most compute saved. By default
    every strategy, and "full or the cheapest": an estimator that misjudges the costly partial
    refreshes can only add loss with them. Returns (family, its Certification, [(family,
    Certification) for every family tried])."""
    from .decide import allowed_strategies

    k1 = len(np.asarray(costs))
    if families is None:
        families = [None, [0, k1 - 1]]
    tried = [(fam, certify_lambda(costs, dq, allowed_strategies(np.asarray(available, bool), fam), q_hat, t, p, r,
                                  session, is_repeat, budget, **options)) for fam in families]
    fam, cert = max(tried, key=lambda fc: (fc[1].certified, fc[1].saved_pct))
    return fam, cert, tried
