"""Off-policy evaluation of a recycling policy on a randomised request log (docs/evaluation.md#protocol).

A policy is a strategy per logged request (π_i). Compute under π is known exactly (c_{π_i},
plus the estimator's own cost on every repeated request); the effect is estimated from the
logged reward of the logged strategy t_i with propensity p_i:

    IPW     V = 1/n Σ 1[t_i = π_i] r_i / p_i
    SNIPW   V = Σ 1[t_i = π_i] r_i / p_i  /  Σ 1[t_i = π_i] / p_i
    DR      V = 1/n Σ [ Q̂_i,π_i + 1[t_i = π_i] (r_i − Q̂_i,t_i) / p_i ]     (Q̂ from the estimator)
    exact   V = 1/n Σ q_i,π_i        (simulator logs with q_0..q_K: the one-step counterfactual)

Effect loss % = 1 − V(π) / V(always full), each with the same estimator; compute saved % =
1 − Σ cost(π) / Σ c_0. Confidence intervals: a Poisson bootstrap over sessions (requests of a
session are correlated), 2.5 and 97.5 percentiles.

Caveat written into every report: a log evaluation is the effect of π's decisions given the
logged cache states. A deployed policy changes later cache states (it recycles more, so caches
grow older); `comrecycle closed-loop` measures that in the simulator.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..specs import N_RECYCLE
from ..errors import UserError

METHODS = ("ipw", "snipw", "dr", "exact")


class EvaluationError(UserError):
    """Inputs that cannot be evaluated, saying what was expected and what arrived."""


def align_decisions(log: pa.Table, decisions: pa.Table) -> np.ndarray:
    """The decisions' strategies in the log's row order; every log request needs exactly one."""
    for c in ("request_id", "strategy"):
        if c not in decisions.column_names:
            raise EvaluationError(f"decisions: missing column {c!r}; expected columns request_id, strategy")
    rid = decisions["request_id"].to_numpy()
    s = decisions["strategy"].to_numpy()
    if not np.issubdtype(rid.dtype, np.integer) or not np.issubdtype(s.dtype, np.integer):
        raise EvaluationError(f"decisions: expected integer request_id and strategy, got "
                              f"{decisions.schema.field('request_id').type} and {decisions.schema.field('strategy').type}")
    if len(np.unique(rid)) != len(rid):
        raise EvaluationError(f"decisions: {len(rid) - len(np.unique(rid))} duplicated request_id(s)")
    if ((s < 0) | (s > N_RECYCLE)).any():
        raise EvaluationError(f"decisions: strategy must be in 0..{N_RECYCLE}, got {sorted(set(s.tolist()))[:10]}")
    order = np.argsort(rid)
    log_rid = log["request_id"].to_numpy()
    pos = np.searchsorted(rid[order], log_rid)
    pos = np.minimum(pos, len(rid) - 1)
    found = rid[order][pos] == log_rid if len(rid) else np.zeros(len(log_rid), bool)
    if not found.all():
        raise EvaluationError(f"decisions: no decision for {int((~found).sum())} of {len(log_rid)} logged requests "
                              f"(e.g. request_id {int(log_rid[~found][0])})")
    extra = len(rid) - len(log_rid)
    if extra > 0:
        raise EvaluationError(f"decisions: {extra} request_id(s) that are not in the log")
    pi = s[order][pos].astype(np.int64)
    rep = log["is_repeat"].to_numpy()
    if (pi[~rep] != 0).any():
        raise EvaluationError(f"decisions: initial requests have nothing cached and must get strategy 0; "
                              f"{int((pi[~rep] != 0).sum())} got another")
    return pi


@dataclass
class LogArrays:
    t: np.ndarray  # [n] logged strategy
    p: np.ndarray  # [n] propensity
    r: np.ndarray  # [n] reward
    session: np.ndarray  # [n] session index 0..S-1
    is_repeat: np.ndarray
    q: np.ndarray | None  # [n, K+1] ground truth or None

    @classmethod
    def from_log(cls, log: pa.Table, label: str = "clicks") -> "LogArrays":
        """label: the reward, "clicks" (the log's `reward`) or "view-adjusted" (labels.py:
        the same expectation with the scrolling-depth noise removed)."""
        from ..estimator.labels import training_labels

        try:
            r = training_labels(log, label)[0].astype(np.float64)
        except ValueError as e:
            raise EvaluationError(str(e)) from None
        q_cols = [f"q_{j}" for j in range(N_RECYCLE + 1)]
        q = (np.stack([log[c].to_numpy().astype(np.float64) for c in q_cols], 1)
             if all(c in log.column_names for c in q_cols) else None)
        _, sess = np.unique(log["session_id"].to_numpy(), return_inverse=True)
        p = log["propensity"].to_numpy().astype(np.float64)
        if not ((p > 0) & (p <= 1)).all():
            raise EvaluationError("log: propensities must be in (0, 1]")
        return cls(log["strategy"].to_numpy().astype(np.int64), p, r, sess, log["is_repeat"].to_numpy(), q)


def _value_terms(a: LogArrays, pi: np.ndarray, q_hat: np.ndarray | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-request (numerator, denominator) terms; V = Σ num / Σ den (weighted by bootstrap)."""
    n = len(pi)
    rows = np.arange(n)
    match = (a.t == pi).astype(np.float64) / a.p
    ones = np.ones(n)
    terms = {"ipw": (match * a.r, ones), "snipw": (match * a.r, match)}
    if q_hat is not None:
        terms["dr"] = (q_hat[rows, pi] + match * (a.r - q_hat[rows, a.t]), ones)
    if a.q is not None:
        v = a.q[rows, pi]
        if not np.isfinite(v).all():
            bad = int((~np.isfinite(v)).sum())
            raise EvaluationError(f"policy chose a strategy that was unavailable (q_j is NaN) for {bad} request(s); "
                                  f"decisions must respect the logged cache state")
        terms["exact"] = (v, ones)
    return terms


def evaluate(log: pa.Table, pi: np.ndarray, costs: np.ndarray, q_hat: np.ndarray | None = None,
             estimator_cost: float = 0.0, n_boot: int = 200, seed: int = 0, label: str = "clicks") -> dict:
    """Compute saved % and effect loss % of π versus always-full on the logged requests.

    q_hat: [n, K+1] predicted effects (for DR); estimator_cost: compute units per repeated
    request spent by the estimator (added to π's compute). Returns a dict per method with the
    point estimate and the bootstrap CI of effect loss %, plus the strategy mix."""
    a = LogArrays.from_log(log, label)
    costs = np.asarray(costs, np.float64)
    n = len(pi)
    full = np.zeros(n, np.int64)
    spent = costs[pi].sum() + estimator_cost * a.is_repeat.sum()
    compute_saved = 1.0 - spent / (costs[0] * n)
    tp, tf = _value_terms(a, pi, q_hat), _value_terms(a, full, q_hat)
    rng = np.random.default_rng([seed, 2718])
    n_sess = a.session.max() + 1 if n else 0
    out = {"requests": int(n), "repeated": int(a.is_repeat.sum()),
           "compute_saved_pct": 100.0 * compute_saved,
           "compute_saved_without_estimator_pct": 100.0 * (1.0 - costs[pi].sum() / (costs[0] * n)),
           "strategy_mix": {str(j): float(np.mean(pi[a.is_repeat] == j)) for j in range(len(costs))},
           "methods": {}}
    boots = [rng.poisson(1.0, n_sess)[a.session].astype(np.float64) for _ in range(n_boot)]
    for m in tp:
        (num_p, den_p), (num_f, den_f) = tp[m], tf[m]

        def loss(w=None):
            if w is None:
                vp, vf = num_p.sum() / den_p.sum(), num_f.sum() / den_f.sum()
            else:
                vp, vf = (w @ num_p) / (w @ den_p), (w @ num_f) / (w @ den_f)
            return 100.0 * (1.0 - vp / vf), vp, vf

        point, vp, vf = loss()
        samples = np.array([loss(w)[0] for w in boots]) if n_boot else np.array([point])
        out["methods"][m] = {"effect_loss_pct": float(point), "ci95": [float(np.percentile(samples, 2.5)),
                                                                      float(np.percentile(samples, 97.5))],
                             "value_policy": float(vp), "value_full": float(vf)}
    return out


def report_markdown(res: dict, title: str = "Off-policy evaluation") -> str:
    lines = [f"# {title}", "",
             f"{res['requests']:,} logged requests ({res['repeated']:,} repeated). "
             f"Compute saved: **{res['compute_saved_pct']:.2f}%** (estimator's cost included; "
             f"{res['compute_saved_without_estimator_pct']:.2f}% without).", "",
             "Strategy mix on repeated requests: " + ", ".join(f"{j}: {v:.1%}" for j, v in res["strategy_mix"].items()),
             "", "| method | effect loss % | 95% CI | V(policy) | V(full) |", "|---|---|---|---|---|"]
    for m, r in res["methods"].items():
        lines.append(f"| {m} | {r['effect_loss_pct']:.3f} | [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | "
                     f"{r['value_policy']:.4f} | {r['value_full']:.4f} |")
    lines += ["", "Evaluated on the logged cache states: a deployed policy that recycles more also ages the "
              "caches it later reads, which a log cannot show (see the closed-loop frontier)."]
    return "\n".join(lines) + "\n"
