"""The whole offline pipeline on logs with ground truth: train-estimator → solve → decide → score.

Three logs of one world, split by user: the estimator is trained on the first, λ is solved
(and certified off-policy) on the second, and the decisions on the third are scored against
its true q_j. Beside the learned policy: the oracle (true ΔQ) at the learned policy's realised
loss, and the best static rule (strategy j on a share of repeats, chosen by the share that
meets the same loss). Used by `comrecycle policy-check` and the tests.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from ..specs import N_RECYCLE
from .certify import LOSS_FLOOR_SHARE, certify_families
from .decide import available_from_log, costs_in_log, decide, policy_dq, predict
from .solver import solve_loss_budget
from ..errors import UserError


@dataclass
class PipelineResult:
    budget: float
    confidence: float
    certified: bool
    lam: float
    certified_loss_pct: float  # DR estimate on the solving log
    certified_bound_pct: float
    floor_pct: float
    realised_loss_pct: float  # true, on the test log
    saved_pct: float  # on the test log (estimator cost excluded: logs from elsewhere carry no profile)
    oracle_saved_pct: float  # the oracle at the realised loss
    static_saved_pct: float  # the best static rule at the realised loss
    mix: dict

    def as_dict(self) -> dict:
        return asdict(self)


def true_q(log: pa.Table) -> np.ndarray:
    cols = [f"q_{j}" for j in range(N_RECYCLE + 1)]
    missing = [c for c in cols if c not in log.column_names]
    if missing:
        raise UserError(f"scoring needs the ground truth {cols}; the log lacks {missing}")
    return np.stack([log[c].to_numpy().astype(np.float64) for c in cols], 1)


def oracle_saving(q: np.ndarray, rep: np.ndarray, costs: np.ndarray, loss_pct: float) -> float:
    """Compute saved % by the oracle (true ΔQ) whose loss is at most loss_pct on this log."""
    q0 = q[:, 0]
    dq = np.where(np.isfinite(q), q0[:, None] - q, np.nan)[rep]
    avail = np.isfinite(dq)
    b_rep = max(0.0, loss_pct / 100) * q0.sum() / q0[rep].sum()
    sol = solve_loss_budget(costs, np.nan_to_num(dq), q0[rep], b_rep, avail)
    return 100 * (1 - (sol.cost + (~rep).sum() * costs[0]) / (costs[0] * len(rep)))


def static_saving(q: np.ndarray, rep: np.ndarray, costs: np.ndarray, loss_pct: float) -> float:
    """Best compute saved % of a static rule 'strategy j on a random share of repeats' whose
    expected loss is at most loss_pct (the loss of such a rule is linear in its share)."""
    q0 = q[:, 0]
    best = 0.0
    for j in range(1, len(costs)):
        ok = rep & np.isfinite(q[:, j])
        loss_all = (q0[ok] - q[ok, j]).sum() / q0.sum() * 100
        share = 1.0 if loss_all <= 0 else min(1.0, max(0.0, loss_pct) / loss_all)
        best = max(best, 100 * share * ok.sum() * (costs[0] - costs[j]) / (costs[0] * len(rep)))
    return best


def run_pipeline(estimator, solve_log: pa.Table, test_log: pa.Table, costs, budget: float,
                 confidence: float = 0.5, label_solve=None, credit_gains: bool = True,
                 predictions: dict | None = None) -> PipelineResult:
    """estimator: a fitted EffectLossEstimator; costs [K+1] with c_0 = 1. λ and the family of
    rules as `comrecycle solve` chooses them (certify_families, the loss floor). predictions:
    a dict run_pipeline fills with the estimator's predictions of both logs and reuses (for
    several budgets with one estimator)."""
    costs = np.asarray(costs, np.float64)
    predictions = {} if predictions is None else predictions
    if "solve" not in predictions:
        predictions["solve"] = predict(solve_log, estimator, repeated_only=True)
        predictions["test"] = predict(test_log, estimator, repeated_only=True)
    q_hat, dq = predictions["solve"]
    rep_s = solve_log["is_repeat"].to_numpy()
    rule = {"costs": list(costs), "lambda": 0.0, "omega": 0.0, "credit_gains": credit_gains,
            "loss_floor": LOSS_FLOOR_SHARE * max(float(q_hat[rep_s, 0].mean()), 1e-9)}
    avail = available_from_log(solve_log)
    r = solve_log["reward"].to_numpy() if label_solve is None else label_solve
    fam, cert, _ = certify_families(costs, policy_dq(dq, rule), avail, q_hat, solve_log["strategy"].to_numpy(),
                                    solve_log["propensity"].to_numpy(), r, solve_log["session_id"].to_numpy(),
                                    rep_s, budget, confidence=confidence)
    rule["lambda"] = cert.lam
    rule["strategies"] = fam
    _, dq_t = predictions["test"]
    rep = test_log["is_repeat"].to_numpy()
    s = decide(policy_dq(dq_t, rule), available_from_log(test_log), rule).astype(np.int64)
    s[~rep] = 0
    q = true_q(test_log)
    rows = np.arange(len(s))
    loss = 100 * (q[:, 0] - q[rows, s]).sum() / q[:, 0].sum()
    saved = 100 * (1 - costs[s].sum() / (costs[0] * len(s)))
    mix = {str(j): float(np.mean(s[rep] == j)) for j in range(len(costs))}
    return PipelineResult(budget, confidence, cert.certified, cert.lam, cert.loss_pct, cert.bound_pct,
                          cert.floor_pct, float(loss), float(saved), oracle_saving(q, rep, costs, loss),
                          static_saving(q, rep, costs, loss), mix)


RANKING_LOSS_FLOOR = 1e-6  # clicks


def ranking_saving(q: np.ndarray, rep: np.ndarray, costs: np.ndarray, dq_hat: np.ndarray,
                   loss_pcts, grid: int = 256) -> np.ndarray:
    """[len(loss_pcts)] the most compute saved % by the rule argmin c_j + λ ΔQ̂_ij, over λ, with a
    true loss of at most each loss_pct: how well a ranking ΔQ̂ [n, K+1] (column 0 = 0) serves the
    policy, with λ tuned on the true loss (the feature ceiling's protocol, docs/evaluation.md#oracle-and-feature-ceiling)."""
    from .certify import lambda_grid, rule_allocation

    q0 = q[:, 0]
    avail = np.isfinite(q) & rep[:, None]
    avail[:, 0] = True
    # as the deployed rule counts it (loss_floor): no recycling is free, so a predicted gain is
    # not recycled at every λ and a large λ serves everything in full
    d = np.where(avail, np.maximum(np.nan_to_num(dq_hat), RANKING_LOSS_FLOOR), 0.0)
    d[:, 0] = 0.0
    rows = np.arange(len(q))
    qt = np.nan_to_num(q)
    pts = []
    for lam in lambda_grid(costs, d, avail, grid):
        s = rule_allocation(costs, d, avail, float(lam))
        pts.append((100 * (q0 - qt[rows, s]).sum() / q0.sum(), 100 * (1 - costs[s].sum() / (costs[0] * len(s)))))
    pts = np.array(pts)
    return np.array([pts[pts[:, 0] <= b, 1].max(initial=0.0) for b in loss_pcts])


def ranking_comparison(estimator, train: pa.Table, test: pa.Table, ceiling_log: pa.Table, costs,
                       loss_pcts, seed: int = 0) -> dict[str, list[float]]:
    """Compute saved % at each true loss in loss_pcts on `test`, λ tuned on the true loss, for
    the ΔQ̂ of: the GRU + MMoE estimator, a T-learner and a DR-learner (gradient-boosted trees
    on the tabular features, fitted on `train`), the feature ceilings (gradient boosting of the
    true ΔQ on summary features, and the estimator's own net fitted to the true q_j, both on
    `ceiling_log`), DCAF by one feature (the best of three), the best static rule and
    the oracle. The same held-out rows for all: how well each ranking serves the policy."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    from ..estimator.baselines import TLearner
    from ..estimator.labels import TRUE_Q
    from ..estimator.training import tabular_features
    from .frontier import feature_ceiling, feature_values, ipw_mean_loss

    costs = np.asarray(costs, np.float64)
    q = true_q(test)
    rep = test["is_repeat"].to_numpy()
    k1 = len(costs)
    zero = np.zeros((test.num_rows, 1))
    out = {"oracle": [oracle_saving(q, rep, costs, b) for b in loss_pcts]}
    _, dq = predict(test, estimator, repeated_only=True)
    out["GRU + MMoE"] = ranking_saving(q, rep, costs, dq, loss_pcts).tolist()
    tr_rep = train["is_repeat"].to_numpy()
    X, Xt = tabular_features(train)[tr_rep], tabular_features(test)
    t = train["strategy"].to_numpy()[tr_rep].astype(np.int64)
    y = train["reward"].to_numpy()[tr_rep].astype(np.float64)
    w = 1.0 / train["propensity"].to_numpy()[tr_rep].astype(np.float64)
    tl = TLearner(min_samples_leaf=100, random_state=seed).fit(X, t, y, w)
    qt = tl.predict(Xt)
    out["T-learner"] = ranking_saving(q, rep, costs, np.concatenate([zero, qt[:, :1] - qt[:, 1:]], 1),
                                      loss_pcts).tolist()
    # DR-learner: nuisance Q̂ cross-fitted over two folds of sessions, then the DR pseudo-outcome
    # of ΔQ_j regressed on the features
    _, sess = np.unique(train["session_id"].to_numpy()[tr_rep], return_inverse=True)
    fold = sess % 2
    qh = np.zeros((len(y), k1))
    for f in (0, 1):
        m = TLearner(min_samples_leaf=100, random_state=seed).fit(X[fold != f], t[fold != f], y[fold != f],
                                                                   w[fold != f])
        qh[fold == f] = m.predict(X[fold == f])
    res = y - qh[np.arange(len(y)), t]
    dr = np.zeros((test.num_rows, k1))
    for j in range(1, k1):
        phi = qh[:, 0] - qh[:, j] + ((t == 0).astype(np.float64) - (t == j)) * w * res
        dr[:, j] = HistGradientBoostingRegressor(min_samples_leaf=200, random_state=seed).fit(X, phi).predict(Xt)
    out["DR-learner"] = ranking_saving(q, rep, costs, dr, loss_pcts).tolist()
    out["feature ceiling"] = ranking_saving(q, rep, costs, feature_ceiling(ceiling_log, test, seed),
                                            loss_pcts).tolist()
    # the estimator's architecture and inputs (item-level history included) fitted to the true
    # q_j of the same log: the ceiling of what those inputs allow, as far as this net finds it
    net_ceiling = dataclasses.replace(estimator, label=TRUE_Q, select="outcome").fit(ceiling_log)
    out["feature ceiling (estimator inputs)"] = ranking_saving(
        q, rep, costs, predict(test, net_ceiling, repeated_only=True)[1], loss_pcts).tolist()
    mean_loss = ipw_mean_loss(train)
    dcaf = []
    for f in ("cache_pages", "secs_since_prev", "prev_clicks"):
        v = feature_values(test, f)
        proxy = mean_loss[None, :] * (0.05 + v[:, None] / max(v[rep].mean(), 1e-12))
        dcaf.append(ranking_saving(q, rep, costs, proxy, loss_pcts))
    out["best DCAF (one feature)"] = np.max(dcaf, axis=0).tolist()
    out["best static"] = [static_saving(q, rep, costs, b) for b in loss_pcts]
    return out


def feed_world_check(requests: int, seeds, budgets, confidence: float = 0.95, train_requests: int | None = None,
                     max_epochs: int = 15, progress: bool = True, compare: bool = False,
                     ensemble: int = 1) -> tuple[list, dict]:
    """The pipeline on the feed world (sim/feed_world.py), per seed: logs seed·10 + 1, 2, 3 for
    training, solving and testing (disjoint users), the log's own costs, every budget. With
    compare: ranking_comparison per seed at the budgets' loss levels (and a fourth log, seed·10
    + 4, of 200 000 requests for the feature ceiling). ensemble: nets of the estimator
    (EffectLossEstimator.ensemble). Returns (rows, {seed: comparison})."""
    from ..estimator.effect_loss import EffectLossEstimator
    from ..sim.feed_world import simulate_feed_log

    rows, comparisons = [], {}
    for seed in seeds:
        train = simulate_feed_log(train_requests or requests, seed=seed * 10 + 1)
        solve, test = simulate_feed_log(requests, seed=seed * 10 + 2), simulate_feed_log(requests, seed=seed * 10 + 3)
        costs, _ = costs_in_log(train)
        est = EffectLossEstimator(max_epochs=max_epochs, seed=seed, progress=progress, ensemble=ensemble).fit(train)
        q = true_q(test)
        rep = test["is_repeat"].to_numpy()
        cache: dict = {}
        for b in budgets:
            r = run_pipeline(est, solve, test, costs, b, confidence=confidence, predictions=cache).as_dict()
            dq = cache["test"][1]
            r["ranking_saved_pct"] = float(ranking_saving(q, rep, costs, dq, [r["realised_loss_pct"]])[0])
            rows.append({"seed": seed, "requests": requests, **r})
        if compare:
            comparisons[seed] = ranking_comparison(est, train, test, simulate_feed_log(200_000, seed=seed * 10 + 4),
                                                   costs, [100 * b for b in budgets], seed=seed)
    return rows, comparisons


def comparison_markdown(comparisons: dict, budgets) -> str:
    if not comparisons:
        return ""
    names = list(next(iter(comparisons.values())))
    head = " | ".join(f"{100 * b:g}% loss" for b in budgets)
    lines = ["", "## Rankings at equal true loss (one step, the test log; compute saved %, mean over seeds "
                 f"{', '.join(map(str, comparisons))})", "", f"| ΔQ̂ from | {head} |",
             "|---" * (len(budgets) + 1) + "|"]
    for name in names:
        vals = np.mean([comparisons[s][name] for s in comparisons], axis=0)
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    return "\n".join(lines) + "\n"


def check_markdown(rows: list[dict], title: str) -> str:
    lines = [f"# {title}", "",
             "| seed | requests | budget | confidence | λ | certified loss (DR) | bound | noise floor | realised loss | "
             "realised / budget | saved | oracle at that loss | best static at that loss | saved / oracle | "
             "mix of repeated (0/1/2/3) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["saved_pct"] / r["oracle_saved_pct"] if r["oracle_saved_pct"] > 0 else float("nan")
        floor = f"{r['floor_pct']:.2f}%" if np.isfinite(r["floor_pct"]) else "none"
        lines.append(f"| {r['seed']} | {r['requests']:,} | {100 * r['budget']:g}% | {r['confidence']:g} | {r['lam']:.4g} | "
                     f"{r['certified_loss_pct']:.2f}% | {r['certified_bound_pct']:.2f}% | {floor} | "
                     f"{r['realised_loss_pct']:.2f}% | {r['realised_loss_pct'] / (100 * r['budget']):.2f} | "
                     f"{r['saved_pct']:.2f}% | {r['oracle_saved_pct']:.2f}% | {r['static_saved_pct']:.2f}% | "
                     f"{ratio:.2f} | " + "/".join(f"{100 * v:.0f}" for v in r["mix"].values()) + " |")
    held = sum(r["realised_loss_pct"] <= 115 * r["budget"] for r in rows)
    lines += ["", f"Realised loss within 1.15 × budget in {held} of {len(rows)} runs."]
    return "\n".join(lines) + "\n"
