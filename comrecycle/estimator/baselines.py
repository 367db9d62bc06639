"""Baseline effect-loss estimators with an sklearn-like surface (docs/method.md#effect-loss-estimator).

Both are fitted on a randomised log: X [n, d] float features of repeated requests, t [n] int
logged strategy in 0..K (0 = full computation), y [n] float observed reward (clicks), and
optionally sample_weight [n] (e.g. 1/propensity). Both predict

    predict(X)       -> Q̂ [n, K+1]   expected reward of each strategy 0..K
    predict_delta(X) -> ΔQ̂ [n, K]    Q̂_0 - Q̂_j, the predicted effect loss of recycling with j

TLearner        one HistGradientBoostingRegressor per arm, fitted on that arm's rows only.
ConstantModel   each arm's (weighted) mean reward for everyone: a ΔQ̂ constant per treatment,
                i.e. a random ranking (its AUUC is exactly the random AUUC).
"""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from .evaluation import strategy_ids
from ..errors import UserError


def _check_fit_inputs(X, t, y, sample_weight, n_treatments: int):
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0:
        raise UserError(f"X: expected shape [n, d] with n >= 1, got {tuple(X.shape)}")
    if not np.issubdtype(X.dtype, np.number):
        raise UserError(f"X: expected numbers, got dtype {X.dtype}")
    X = X.astype(np.float64, copy=False)
    n = X.shape[0]
    t = np.asarray(t)
    if t.shape != (n,):
        raise UserError(f"t: expected shape [n] with n={n} (rows of X), got {tuple(t.shape)}")
    t = strategy_ids(t, n_treatments, f"n_treatments={n_treatments}")
    y = np.asarray(y)
    if y.shape != (n,):
        raise UserError(f"y: expected shape [n] with n={n} (rows of X), got {tuple(y.shape)}")
    y = y.astype(np.float64)
    if not np.isfinite(y).all():
        raise UserError(f"y: expected finite rewards, got {int((~np.isfinite(y)).sum())} NaN/inf value(s)")
    if sample_weight is not None:
        sample_weight = np.asarray(sample_weight, dtype=np.float64)
        if sample_weight.shape != (n,):
            raise UserError(f"sample_weight: expected shape [n] with n={n} (rows of X), "
                             f"got {tuple(sample_weight.shape)}")
        if not np.isfinite(sample_weight).all() or (sample_weight < 0).any():
            raise UserError("sample_weight: expected finite values >= 0")
    counts = np.bincount(t, minlength=n_treatments + 1)
    if sample_weight is not None:
        wsum = np.bincount(t, sample_weight, n_treatments + 1)
        if (wsum[counts > 0] <= 0).any():
            raise UserError(f"sample_weight: expected a positive total weight per arm, got "
                             f"{dict(enumerate(wsum.tolist()))}")
    missing = [a for a in range(n_treatments + 1) if counts[a] == 0]
    if missing:
        raise UserError(f"t: expected rows for every arm 0..{n_treatments}, got none for arm(s) {missing}; "
                         f"rows per arm: {dict(enumerate(counts.tolist()))}")
    return X, t, y, sample_weight


def _check_predict_X(est, X) -> np.ndarray:
    check_is_fitted(est)
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[1] != est.n_features_in_:
        raise UserError(f"X: expected shape [n, {est.n_features_in_}] (as in fit), got {tuple(X.shape)}")
    return X.astype(np.float64, copy=False)


class _DeltaMixin:
    def predict_delta(self, X) -> np.ndarray:
        """X [n, d] -> ΔQ̂ [n, K] = Q̂_0 - Q̂_j for j = 1..K (positive = recycling loses)."""
        q = self.predict(X)
        return q[:, :1] - q[:, 1:]


class TLearner(_DeltaMixin, BaseEstimator):
    """T-learner: one HistGradientBoostingRegressor per arm 0..K, each fitted on its arm's rows.

    max_iter, random_state, learning_rate, min_samples_leaf: passed to every regressor
    (random_state seeds each one, so fits are reproducible); n_treatments: K (strategies 1..K
    besides the control 0); n_threads: OpenMP threads used by fit/predict (None = sklearn's
    default, all cores). The default 1 is deliberate: HGB runs many short OpenMP regions whose
    barriers spin when the cores are busy with other work (measured on a 2-core box with other
    jobs running: 1.2 s single-threaded vs ~200 s with 2 threads for the same 4-arm fit).
    Fitted: models_ (list of K+1 regressors), n_features_in_.
    """

    def __init__(self, max_iter: int = 200, random_state: int | None = 0, n_treatments: int = 3,
                 learning_rate: float = 0.1, min_samples_leaf: int = 20, n_threads: int | None = 1):
        self.max_iter = max_iter
        self.random_state = random_state
        self.n_treatments = n_treatments
        self.learning_rate = learning_rate
        self.min_samples_leaf = min_samples_leaf
        self.n_threads = n_threads

    def _threads(self):
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=self.n_threads, user_api="openmp")

    def fit(self, X, t, y, sample_weight=None) -> "TLearner":
        """X [n, d] float (NaN allowed: HGB handles it); t [n] int in 0..K; y [n] float;
        sample_weight [n] or None. Every arm needs at least one row."""
        from sklearn.ensemble import HistGradientBoostingRegressor

        X, t, y, sw = _check_fit_inputs(X, t, y, sample_weight, self.n_treatments)
        self.models_ = []
        with self._threads():
            for arm in range(self.n_treatments + 1):
                m = t == arm
                reg = HistGradientBoostingRegressor(max_iter=self.max_iter, learning_rate=self.learning_rate,
                                                    min_samples_leaf=self.min_samples_leaf,
                                                    random_state=self.random_state)
                reg.fit(X[m], y[m], sample_weight=None if sw is None else sw[m])
                self.models_.append(reg)
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X) -> np.ndarray:
        """X [n, d] -> Q̂ [n, K+1]: each arm's regressor's prediction."""
        X = _check_predict_X(self, X)
        with self._threads():
            return np.stack([m.predict(X) for m in self.models_], axis=1)


class ConstantModel(_DeltaMixin, BaseEstimator):
    """Predicts each arm's mean reward (weighted by sample_weight, e.g. 1/propensity: the IPW /
    Hajek estimate of E[y(j)]) for every request. Fitted: arm_means_ [K+1], n_features_in_."""

    def __init__(self, n_treatments: int = 3):
        self.n_treatments = n_treatments

    def fit(self, X, t, y, sample_weight=None) -> "ConstantModel":
        """Same inputs as TLearner.fit; X is only checked for shape."""
        X, t, y, sw = _check_fit_inputs(X, t, y, sample_weight, self.n_treatments)
        w = np.ones_like(y) if sw is None else sw
        k1 = self.n_treatments + 1
        wsum = np.bincount(t, w, k1)
        self.arm_means_ = np.bincount(t, w * y, k1) / wsum
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X) -> np.ndarray:
        """X [n, d] -> Q̂ [n, K+1], every row equal to arm_means_."""
        X = _check_predict_X(self, X)
        return np.broadcast_to(self.arm_means_, (X.shape[0], self.arm_means_.size)).copy()
