"""Reweighting a randomised log to the traffic the deployed rule serves (covariate shift).

A randomised log is logged under a uniform choice among the available strategies, so its cache
states are those that uniform recycling leaves behind: older lists, deeper into them. The
deployed rule refreshes many of its repeats and so keeps its caches fresher, and fresh caches
lose less; λ certified on the log's own states then over-estimates what the rule loses where it
is deployed (docs/RESULTS.md, "Why the certified rule under-spends").

The outcome of a strategy depends on the request's state, not on which policy led there (the
cache state, the gap, the previous page and the history are all in the row), so the loss of a
rule on the served traffic is the log's loss reweighted by the density ratio of the states:

    w(x) = P_served(x) / P_log(x) = P(served | x) / P(log | x) · n_log / n_served

estimated by a probabilistic classifier that tells the two logs' repeated requests apart by
their state features, cross-fitted: a log row's weight comes from a classifier that did not see
it. Only repeated requests are reweighted (initial requests are the same in both traffics), to a
mean of 1. The served log needs the request-log feature columns and `cache_state`, not rewards,
propensities or randomisation: any log of the requests the deployed router served will do.

The served traffic depends on λ itself: a smaller λ recycles more and ages the caches further.
Certified on the traffic of the rule it replaces, the new λ is right for that traffic, and one
more round (serve, log, re-solve) brings the two together.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from ..errors import UserError
from ..specs import CACHE_STATE_FIELDS, N_RECYCLE

# per list read by strategies 1..K: present, log age, pages served, log items left, origin page
# (request page - pages served); then log gap, page, exposures and clicks of the previous page,
# history length
STATE_FEATURES = tuple([f"{name}_{j}" for j in range(1, N_RECYCLE + 1)
                        for name in ("present", "log_age", "pages_served", "log_items_left", "origin_page")]
                       + ["log_secs_since_prev", "page", "prev_exposures", "prev_clicks", "history_length"])
DEFAULT_FOLDS = 5
DEFAULT_MAX_WEIGHT = 20.0  # clip: a few requests must not carry the estimate (effective size falls)


class ShiftError(UserError):
    """A served log or options that cannot reweight the certification log."""


@dataclass
class ShiftWeights:
    weights: np.ndarray  # [n] one per row of the certification log: 1 on initial requests, mean 1 on repeats
    auc: float  # out-of-fold AUC of the classifier: 0.5 = no shift it can see
    effective_share: float  # (Σw)² / Σw² / n over the repeated rows: what the reweighting costs in sample size
    clipped_share: float  # repeated rows whose weight hit max_weight
    max_weight: float
    log_repeats: int
    served_repeats: int

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("weights")
        d["method"] = "density ratio of the repeated requests' states, cross-fitted gradient-boosting classifier"
        d["features"] = list(STATE_FEATURES)
        return d


def state_features(table: pa.Table) -> np.ndarray:
    """[n, len(STATE_FEATURES)] float64: what tells a cache's state apart, from log columns."""
    from ..estimator.log_features import cache_state_from_log, has_cache_state

    if not has_cache_state(table):
        raise ShiftError("reweighting to the served traffic needs the `cache_state` column in both logs "
                         "(docs/contracts.md#request-log-schema); this log has none")
    n = table.num_rows
    cs = cache_state_from_log(table).astype(np.float64).reshape(n, N_RECYCLE, len(CACHE_STATE_FIELDS))
    present = cs[:, :, 0] >= 0
    age, pages, items = (np.where(present, cs[:, :, f], 0.0) for f in range(3))
    page = table["page"].to_numpy().astype(np.float64)
    origin = np.where(present, page[:, None] - pages, -1.0)
    per_list = np.stack([present.astype(np.float64), np.log1p(np.maximum(age, 0)), pages,
                         np.log1p(np.maximum(items, 0)), origin], axis=2).reshape(n, -1)
    secs = table["secs_since_prev"].to_numpy().astype(np.float64)
    hist_len = np.asarray(table["history"].combine_chunks().value_lengths().fill_null(0), np.float64)
    rest = np.stack([np.log1p(np.maximum(secs, 0)), page, table["prev_exposures"].to_numpy().astype(np.float64),
                     table["prev_clicks"].to_numpy().astype(np.float64), hist_len], axis=1)
    return np.concatenate([per_list, rest], axis=1)


def density_ratio(x_log: np.ndarray, x_served: np.ndarray, folds: int = DEFAULT_FOLDS, seed: int = 0
                  ) -> tuple[np.ndarray, float]:
    """(P_served(x)/P_log(x) at each row of x_log [n, F], out-of-fold AUC). Each of `folds`
    classifiers is fitted on the other folds of both samples and scores its own fold of x_log,
    so no row's ratio comes from a classifier that saw it."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score

    if folds < 2:
        raise ShiftError(f"folds: expected at least 2 for cross-fitting, got {folds}")
    rng = np.random.default_rng(seed)
    f_log = rng.permutation(np.arange(len(x_log)) % folds)
    f_srv = rng.permutation(np.arange(len(x_served)) % folds)
    ratio = np.empty(len(x_log))
    p_log = np.empty(len(x_log))
    p_srv = np.empty(len(x_served))
    for k in range(folds):
        tr_l, tr_s = f_log != k, f_srv != k
        X = np.concatenate([x_log[tr_l], x_served[tr_s]])
        y = np.concatenate([np.zeros(tr_l.sum()), np.ones(tr_s.sum())])
        clf = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1, max_leaf_nodes=15,
                                             min_samples_leaf=50, l2_regularization=1.0, early_stopping=True,
                                             validation_fraction=0.15, random_state=seed + k)
        clf.fit(X, y)
        p = np.clip(clf.predict_proba(x_log[~tr_l])[:, 1], 1e-6, 1 - 1e-6)
        p_log[~tr_l] = p
        ratio[~tr_l] = p / (1 - p) * tr_l.sum() / tr_s.sum()
        p_srv[~tr_s] = clf.predict_proba(x_served[~tr_s])[:, 1]
    auc = float(roc_auc_score(np.r_[np.zeros(len(p_log)), np.ones(len(p_srv))], np.r_[p_log, p_srv]))
    return ratio, auc


def clip_and_normalise(ratio: np.ndarray, max_weight: float) -> tuple[np.ndarray, float]:
    """(weights with mean 1, each at most max_weight, share of rows clipped). The cap applies
    after normalising, so it is repeated until the clipped weights keep mean 1."""
    if not max_weight > 1:
        raise ShiftError(f"max_weight: expected a cap above 1 (weights have mean 1), got {max_weight:g}")
    w = ratio / ratio.mean()
    for _ in range(50):
        over = w > max_weight
        if not over.any():
            break
        w = np.minimum(w, max_weight)
        free = w < max_weight
        if not free.any():
            break
        # scale the unclipped rows so the mean returns to 1
        w[free] *= (len(w) - max_weight * (~free).sum()) / w[free].sum()
    return w, float((w >= max_weight * (1 - 1e-9)).mean())


def served_traffic_weights(log: pa.Table, served: pa.Table, folds: int = DEFAULT_FOLDS,
                           max_weight: float = DEFAULT_MAX_WEIGHT, seed: int = 0) -> ShiftWeights:
    """Weights [log.num_rows] that reweight the certification log's repeated requests to the
    states of the served log's repeated requests (module docstring)."""
    rep = log["is_repeat"].to_numpy().astype(bool)
    srv_rep = served["is_repeat"].to_numpy().astype(bool)
    need = 20 * folds
    if rep.sum() < need or srv_rep.sum() < need:
        raise ShiftError(f"reweighting needs at least {need} repeated requests in each log; got {int(rep.sum())} "
                         f"in the certification log and {int(srv_rep.sum())} in the served log")
    x_log = state_features(log.filter(pa.array(rep)))
    x_srv = state_features(served.filter(pa.array(srv_rep)))
    ratio, auc = density_ratio(x_log, x_srv, folds, seed)
    w_rep, clipped = clip_and_normalise(ratio, max_weight)
    w = np.ones(log.num_rows)
    w[rep] = w_rep
    eff = float(w_rep.sum() ** 2 / (w_rep @ w_rep) / len(w_rep))
    return ShiftWeights(w, auc, eff, clipped, float(max_weight), int(rep.sum()), int(srv_rep.sum()))
