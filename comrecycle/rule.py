"""The decision rule of a recycling policy (docs/method.md#policy), pure numpy.

One implementation shared by the router (serving), the simulator's closed loop and the offline
tools (solve, decide, certify): given ΔQ̂ [n, K+1] (column 0 = 0), the available strategies and
the params, which strategy serves each request. Imports nothing beyond numpy and specs, so the
serving process loads nothing of the offline tools.
"""
from __future__ import annotations

import numpy as np

from .specs import CACHE_STATE_FIELDS, N_RECYCLE
from .errors import UserError


class SolverError(UserError):
    """Inputs the solver cannot use, saying what was expected and what arrived."""


def project_simplex(v: np.ndarray, available: np.ndarray | None = None) -> np.ndarray:
    """Row-wise Euclidean projection of v [n, m] onto the probability simplex (restricted to
    the available coordinates). Exact: x = max(v - τ, 0) with τ = max_k (Σ_{i<=k} u_i - 1) / k
    over u = v sorted in decreasing order (Condat 2016)."""
    v = np.asarray(v, dtype=np.float64)
    if available is not None:
        if not np.asarray(available).any(axis=1).all():
            raise SolverError("available: every request needs at least one available strategy")
        # any coordinate below max - 1 projects to 0, so this removes the unavailable ones
        vmax = np.max(np.where(available, v, -np.inf), axis=1, keepdims=True)
        v = np.where(available, v, vmax - 2.0)
    u = np.sort(v, axis=1)[:, ::-1]
    css = np.cumsum(u, axis=1)
    css -= 1.0
    css /= np.arange(1, v.shape[1] + 1)
    tau = css.max(axis=1, keepdims=True)
    return np.maximum(v - tau, 0.0)


def depth_guard(available: np.ndarray, cache_state: np.ndarray, max_pages: int | None) -> np.ndarray:
    """available [n, K+1] with j > 0 switched off where the list strategy j reads has already
    served `max_pages` pages (cache_state [n, 3K], pages = the second field): a safety net
    for what the estimator does not see (the loss of deep caches, docs/history.md, "Deep caches: logs, frontiers and the depth guard"). None or
    0 = no guard."""
    if not max_pages:
        return available
    pages = np.asarray(cache_state, np.float32).reshape(len(available), N_RECYCLE, len(CACHE_STATE_FIELDS))[:, :, 1]
    out = available.copy()
    out[:, 1:] &= pages < max_pages
    return out


def allowed_strategies(available: np.ndarray, strategies) -> np.ndarray:
    """available [n, K+1] restricted to `strategies` (ids; 0 is always kept), or unchanged for
    None: the family of rules a certified λ belongs to (`solve` may certify "full or the
    cheapest strategy" when the others only add loss)."""
    if strategies is None:
        return available
    keep = np.zeros(available.shape[1], bool)
    keep[0] = True
    keep[list(strategies)] = True
    return available & keep[None, :]


def policy_dq(dq: np.ndarray, params: dict) -> np.ndarray:
    """ΔQ̂ [n, K+1] as the policy counts it. By default the net prediction. With
    `credit_gains: false`, max(ΔQ̂, 0): a predicted gain (recycling better than the full
    cascade) is not banked against the budget. The budget is a net sum of small numbers: an
    estimator slightly too optimistic on the many young caches cancels the true loss of the few
    deep ones, and the λ controller then sees no violation (docs/history.md, "The net budget and its fix").
    With `loss_floor: m` (> 0, clicks), max(ΔQ̂_j, m) for j >= 1: no recycling is counted as
    free, so a large enough λ serves every request in full (the certified solve's family ends
    there, policy/certify.py)."""
    floor = params.get("loss_floor")
    if floor:
        out = np.maximum(dq, float(floor))
        out[:, 0] = dq[:, 0]
        return out
    if params.get("credit_gains", True):
        return dq
    return np.maximum(dq, 0.0)


def decide(dq: np.ndarray, available: np.ndarray, params: dict, seed: int = 0) -> np.ndarray:
    """[n] int8: argmax_j -(c_j + λ ΔQ_ij) over available j (ω = 0, ties to the lower id), or
    from x_i = Π_simplex(-(c + λ ΔQ_i)/ω) by argmax / a seeded draw (ω > 0); only strategies
    in params["strategies"] when it is set (allowed_strategies)."""
    c = np.asarray(params["costs"], np.float64)
    lam, omega = float(params["lambda"]), float(params.get("omega", 0.0))
    available = allowed_strategies(available, params.get("strategies"))
    score = c[None, :] + lam * np.where(available, dq, 0.0)
    if omega <= 0:
        return np.argmin(np.where(available, score, np.inf), axis=1).astype(np.int8)
    x = project_simplex(-score / omega, available)
    if params.get("choice", "argmax") == "argmax":
        return np.argmax(x, axis=1).astype(np.int8)
    rng = np.random.default_rng(seed)
    cum = np.cumsum(x, axis=1)
    return np.minimum((cum < rng.random((len(x), 1)) * cum[:, -1:]).sum(axis=1), x.shape[1] - 1).astype(np.int8)
