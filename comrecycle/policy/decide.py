"""From an estimator and a log to policy parameters (solve) and per-request decisions (decide).

The params file (JSON, written by `comrecycle solve`, read by `decide` and by the router):
    lambda, omega, choice ('argmax' | 'sample'), costs [K+1] (c_j), estimator_cost (compute
    units per repeated request), budget (relative effect loss b), form, estimator (version
    info), solved_on (log, requests), predicted (loss %, compute saved % on the solving log),
    max_pages (depth guard), credit_gains (false: predicted gains are not banked against the
    budget, see policy_dq), loss_floor (the least loss any recycling is counted with, see
    policy_dq), strategies (the strategies the rule may use, all when absent),
    certification (the off-policy check of λ, policy/certify.py).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..specs import CACHE_STATE_FIELDS, N_RECYCLE
from ..rule import SolverError, allowed_strategies, decide, depth_guard, policy_dq  # noqa: F401 (re-exported)
from ..router.params import ParamsError, RouterParams, read_params_json
from .solver import solve_loss_budget, solve_soft



def costs_in_log(log: pa.Table) -> tuple[np.ndarray | None, str]:
    """(c_j normalised to c_0 = 1, "") from the log's `cost` column, or (None, why not)."""
    if "cost" not in log.column_names:
        return None, "the log has no `cost` column"
    s = log["strategy"].to_numpy()
    c = log["cost"].to_numpy().astype(np.float64)
    missing = [j for j in range(N_RECYCLE + 1) if not (s == j).any()]
    if missing:
        return None, f"the log has no request served by strategy {missing}"
    costs = np.array([c[s == j].mean() for j in range(N_RECYCLE + 1)])
    if not np.isfinite(costs).all() or (costs < 0).any() or costs[0] <= 0:
        return None, f"mean `cost` per strategy must be finite, >= 0 and > 0 for strategy 0, got {costs.tolist()}"
    return costs / costs[0], ""


def available_from_log(log: pa.Table, max_pages: int | None = None) -> np.ndarray:
    """[n, K+1] bool: strategy 0 always; j > 0 on repeated requests whose cached list was
    present (cache_state >= 0; without that column, q_j not NaN in simulator logs); all of
    them when the log says nothing about the cache. max_pages: the depth guard (depth_guard)."""
    n = log.num_rows
    rep = log["is_repeat"].to_numpy()
    avail = np.zeros((n, N_RECYCLE + 1), bool)
    avail[:, 0] = True
    avail[:, 1:] = rep[:, None]
    if "cache_state" in log.column_names:
        from ..estimator.log_features import cache_state_from_log

        flat = cache_state_from_log(log)
        cs = flat.reshape(n, N_RECYCLE, len(CACHE_STATE_FIELDS))
        avail[:, 1:] &= cs[:, :, 0] >= 0
        avail = depth_guard(avail, flat, max_pages)
    else:
        if max_pages:
            raise SolverError("a depth guard (max_pages) needs the log's cache_state column")
        # without the cache state, the ground truth says it: q_j is NaN where nothing was
        # cached. (With it, q_j is no guide: a log written without counterfactuals has q_j of
        # the served strategy only, NaN for the others even when they were available.)
        q_cols = [f"q_{j}" for j in range(1, N_RECYCLE + 1)]
        if all(c in log.column_names for c in q_cols):
            q = np.stack([log[c].to_numpy() for c in q_cols], 1)
            avail[:, 1:] &= np.isfinite(q)
    return avail


def predict(log: pa.Table, estimator, repeated_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(Q̂ [n, K+1], ΔQ̂ [n, K+1] with column 0 = 0) for every request of the log; with
    repeated_only, zeros for the initial requests, which nothing is decided for (the
    estimator's GRU is most of `solve`'s time)."""
    if repeated_only:
        rep = log["is_repeat"].to_numpy()
        q = np.zeros((log.num_rows, N_RECYCLE + 1))
        dq = np.zeros((log.num_rows, N_RECYCLE + 1))
        if rep.any():
            q[rep], dq[rep] = predict(log.filter(pa.array(rep)), estimator)
        return q, dq
    q, dq = estimator.predict_log(log)
    return q.astype(np.float64), np.concatenate([np.zeros((len(dq), 1)), dq], 1).astype(np.float64)


def total_effect(log: pa.Table, q_hat: np.ndarray) -> np.ndarray:
    """Per-request Q_i0 for the budget: predicted for repeated requests, the observed reward
    for initial ones (the estimator is trained on repeated requests only)."""
    rep = log["is_repeat"].to_numpy()
    return np.where(rep, q_hat[:, 0], log["reward"].to_numpy().astype(np.float64))


def estimator_version(est_dir: str | Path) -> dict:
    est_dir = Path(est_dir)
    m = json.loads((est_dir / "manifest.json").read_text())
    digest = hashlib.sha256((est_dir / "estimator.onnx").read_bytes()).hexdigest()[:16]
    return {"path": str(est_dir), "onnx_sha256_16": digest, "trained_on": m.get("training_log"),
            "uses_cache_state": m.get("uses_cache_state", False)}


def solve_params(log: pa.Table, q_hat: np.ndarray, dq: np.ndarray, costs: np.ndarray, budget: float,
                 omega: float = 0.0, choice: str = "argmax", estimator_cost: float = 0.0,
                 max_pages: int | None = None, credit_gains: bool = True) -> dict:
    """λ for the loss budget b on this log's requests (repeated ones decide; B = b·Σ Q_i0).
    credit_gains=False: the budget counts max(ΔQ̂, 0) (policy_dq)."""
    dq = policy_dq(dq, {"credit_gains": credit_gains})
    avail = available_from_log(log, max_pages)
    rep = log["is_repeat"].to_numpy()
    q0 = total_effect(log, q_hat)
    # the budget is over all requests; only repeated ones can spend it
    b_rep = budget * q0.sum() / max(q0[rep].sum(), 1e-12)
    if omega > 0:
        sol = solve_soft(costs, dq[rep], q0[rep], b_rep, omega, avail[rep], choice=choice)
    else:
        sol = solve_loss_budget(costs, dq[rep], q0[rep], b_rep, avail[rep])
    spent = sol.cost + (~rep).sum() * costs[0] + estimator_cost * rep.sum()
    return {"lambda": float(sol.lam), "omega": float(omega), "choice": choice,
            "costs": [float(x) for x in costs], "estimator_cost": float(estimator_cost),
            "budget": float(budget), "form": "loss budget, " + ("ω → 0" if omega <= 0 else f"ω = {omega}"),
            "max_pages": int(max_pages) if max_pages else None, "credit_gains": bool(credit_gains),
            "predicted": {"effect_loss_pct": 100.0 * sol.loss / q0.sum(),
                          "compute_saved_pct": 100.0 * (1.0 - spent / (costs[0] * len(rep))),
                          "strategy_mix": {str(j): float(np.mean(sol.strategy == j))
                                           for j in range(len(costs))}}}


def load_params(path: str | Path) -> dict:
    """A params file as the dict decide() takes (with the rest of the file's keys), validated by the
    one params validator the router uses too (router.params.RouterParams): a ParamsError (a
    UserError) says what was expected."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file {path} does not exist; write one with `comrecycle solve`")
    p = read_params_json(path)
    return {**p, **RouterParams.from_dict(p, str(path)).as_decide_params()}