"""The compute-quality frontier (docs/evaluation.md#oracle-and-feature-ceiling): compute saved vs effect loss for ComRecycle,
the baselines and the oracle, on a randomised log with ground truth q_0..q_K.

Every policy has one knob that trades compute for loss; sweeping it traces a curve of
(effect loss %, compute saved %) points, evaluated exactly with the log's q_j (one-step
counterfactual on the logged cache states). Policies are compared at equal realised loss:
each curve is interpolated at the loss budget b.

  comrecycle   ΔQ̂ from the estimator, the Lagrangian solver (knob λ); its estimator cost counted
  oracle       true ΔQ = q_0 - q_j, the same solver (no estimator cost: an upper bound)
  feature ceiling  regressors of the true ΔQ_j fitted on a separate log, from the observable
               features only (optional; see feature_ceiling)
  dcaf-<f>     DCAF-style allocation with a hand-picked feature instead of learned uplift:
               ΔQ_ij ∝ mean loss of j (from the log, IPW) × feature_i / mean(feature)
  static-<j>   recycle a random fraction p of the repeated requests with strategy j (knob p)
  random       recycle a random fraction p with a uniformly random available strategy
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..specs import CACHE_STATE_FIELDS, N_RECYCLE
from .decide import available_from_log
from .solver import solve_loss_budget
from ..errors import UserError


@dataclass
class Curve:
    name: str
    loss_pct: np.ndarray  # [m] increasing
    saved_pct: np.ndarray  # [m]
    extra_cost: float = 0.0  # compute units per repeated request already subtracted

    def saved_at(self, loss_pct: float) -> float:
        """The most compute saved with a realised loss <= loss_pct (upper envelope of the
        points, mixing neighbours linearly); NaN below the curve's smallest loss."""
        order = np.argsort(self.loss_pct, kind="stable")
        x, y = self.loss_pct[order], np.maximum.accumulate(self.saved_pct[order])
        if loss_pct < x[0]:
            return float("nan")
        return float(np.interp(loss_pct, x, y))  # beyond the last point: its saving


class Ground:
    """The log's ground truth: q [n, K+1], availability, costs; exact loss / saving of a choice."""

    def __init__(self, log: pa.Table, costs: np.ndarray):
        self.n = log.num_rows
        self.rep = log["is_repeat"].to_numpy()
        cols = [f"q_{j}" for j in range(N_RECYCLE + 1)]
        missing = [c for c in cols if c not in log.column_names]
        if missing:
            raise UserError(f"the frontier needs ground-truth columns {cols}; missing {missing} "
                             f"(write the log with `comrecycle simulate --logging random`)")
        self.q = np.stack([log[c].to_numpy(zero_copy_only=False).astype(np.float64) for c in cols], 1)
        if not np.isfinite(self.q[self.rep, 1:]).any():
            raise UserError(f"the frontier needs q_1..q_{N_RECYCLE} on repeated requests; this log has none "
                             f"({int(self.rep.sum())} repeats; a --logging full log carries q_0 only): write it "
                             f"with `comrecycle simulate --logging random`")
        self.avail = available_from_log(log)
        self.dq = np.where(self.avail, self.q[:, :1] - self.q, 0.0)
        self.costs = np.asarray(costs, np.float64)
        self.total_q0 = float(self.q[:, 0].sum())

    def point(self, s: np.ndarray, extra_cost: float = 0.0) -> tuple[float, float]:
        rows = np.arange(self.n)
        if not self.avail[rows, s].all():
            raise ValueError("a policy chose an unavailable strategy")
        loss = float(self.dq[rows, s].sum()) / self.total_q0
        spent = float(self.costs[s].sum()) + extra_cost * self.rep.sum()
        return 100.0 * loss, 100.0 * (1.0 - spent / (self.costs[0] * self.n))


def _solver_curve(name, g: Ground, dq_pred: np.ndarray, q0_pred: np.ndarray, budgets, extra_cost=0.0) -> Curve:
    """Sweep the predicted-loss budget of the solver; realised points from the ground truth."""
    rep = g.rep
    pts = [g.point(np.zeros(g.n, np.int64), extra_cost)]
    for b in budgets:
        sol = solve_loss_budget(g.costs, dq_pred[rep], q0_pred[rep], b * q0_pred.sum() / q0_pred[rep].sum(),
                                g.avail[rep])
        s = np.zeros(g.n, np.int64)
        s[rep] = sol.strategy
        pts.append(g.point(s, extra_cost))
    pts = np.array(pts)
    return Curve(name, pts[:, 0], pts[:, 1], extra_cost)


def _fraction_curve(name, g: Ground, pick, fractions, seed) -> Curve:
    rng = np.random.default_rng(seed)
    u = rng.random(g.n)
    pts = []
    for p in fractions:
        s = np.where(g.rep & (u < p), pick(rng), 0)
        s = np.where(g.avail[np.arange(g.n), s], s, 0)
        pts.append(g.point(s))
    pts = np.array(pts)
    return Curve(name, pts[:, 0], pts[:, 1])


def ipw_mean_loss(log: pa.Table) -> np.ndarray:
    """[K+1] the mean effect loss of each strategy on repeated requests, from the logged rewards
    (IPW difference of means; what a DCAF-style system would estimate without a model)."""
    rep = log["is_repeat"].to_numpy()
    t, r, p = (log[c].to_numpy()[rep] for c in ("strategy", "reward", "propensity"))
    w = 1.0 / p.astype(np.float64)
    v = np.array([np.sum(w * r * (t == j)) / max(np.sum(w * (t == j)), 1e-12) for j in range(N_RECYCLE + 1)])
    return v[0] - v


def feature_values(log: pa.Table, name: str) -> np.ndarray:
    if name == "cache_pages":  # pages served from the list each strategy reads (max over them)
        from ..estimator.log_features import cache_state_from_log

        cs = cache_state_from_log(log).reshape(log.num_rows, N_RECYCLE, len(CACHE_STATE_FIELDS))
        return np.maximum(cs[:, :, 1].max(axis=1), 0.0)
    if name == "secs_since_prev":
        return np.maximum(log["secs_since_prev"].to_numpy().astype(np.float64), 0.0)
    if name == "prev_clicks":
        return log["prev_clicks"].to_numpy().astype(np.float64)
    raise UserError(f"unknown DCAF feature {name!r}; expected cache_pages, secs_since_prev or prev_clicks")


@dataclass
class FeatureCeiling:
    """Regressors of the *true* ΔQ_j (j = 1..K) from the observable features
    (policy.guards.observable_features), fitted on a randomised log with q_j. With λ tuned on the
    true loss, the feature ceiling of docs/evaluation.md#oracle-and-feature-ceiling: the best a
    policy that sees only these features can expect, as opposed to the oracle, which also knows
    the latent intent and the noise of each request."""

    models: list  # K fitted regressors, strategy 1..K

    @classmethod
    def fit(cls, train_log: pa.Table, seed: int = 0) -> "FeatureCeiling":
        from .guards import noisy_target_regressor, observable_features

        g = Ground(train_log, np.ones(N_RECYCLE + 1))
        x = np.concatenate(observable_features(train_log), 1)
        models = []
        for j in range(1, N_RECYCLE + 1):
            rows = g.rep & g.avail[:, j]
            if rows.sum() < 100:
                raise UserError(f"feature ceiling: the training log has {int(rows.sum())} repeats with strategy {j} "
                                 f"available; expected at least 100 (a randomised log of a few thousand requests)")
            models.append(noisy_target_regressor(seed).fit(x[rows], g.dq[rows, j]))
        return cls(models)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """[n, K+1] ΔQ̂ (column 0 = 0) from observable features x [n, 3K + len(OBSERVABLE_EXTRA)]."""
        out = np.zeros((len(x), N_RECYCLE + 1))
        for j, m in enumerate(self.models, start=1):
            out[:, j] = m.predict(x)
        return out


def feature_ceiling(train_log: pa.Table, log: pa.Table, seed: int = 0) -> np.ndarray:
    """[n, K+1] ΔQ̂ of `log` (column 0 = 0) by FeatureCeiling fitted on a separate randomised
    log of the same world."""
    from .guards import observable_features

    return FeatureCeiling.fit(train_log, seed).predict(np.concatenate(observable_features(log), 1))


def frontier(log: pa.Table, costs, q_hat: np.ndarray | None = None, dq_hat: np.ndarray | None = None,
             estimator_cost: float = 0.0, budgets=(0.0025, 0.005, 0.01, 0.02, 0.05),
             dcaf_features=("cache_pages", "secs_since_prev", "prev_clicks"), seed: int = 0,
             ceiling_log: pa.Table | None = None) -> dict:
    """All curves + the comparison table at each budget. dq_hat [n, K+1] (column 0 = 0).
    ceiling_log: a separate randomised log of the same world; adds the "feature ceiling" curve."""
    g = Ground(log, costs)
    sweep = np.unique(np.concatenate([np.geomspace(1e-4, 0.3, 40), np.asarray(budgets, float)]))
    fractions = np.linspace(0.0, 1.0, 41)
    curves = []
    if dq_hat is not None:
        q0_pred = np.where(g.rep, q_hat[:, 0], log["reward"].to_numpy())
        curves.append(_solver_curve("comrecycle", g, dq_hat, q0_pred, sweep, estimator_cost))
    curves.append(_solver_curve("oracle", g, g.dq, g.q[:, 0], sweep))
    if ceiling_log is not None:
        curves.append(_solver_curve("feature ceiling", g, feature_ceiling(ceiling_log, log, seed), g.q[:, 0], sweep))
    mean_loss = ipw_mean_loss(log)
    for f in dcaf_features:
        v = feature_values(log, f)
        scale = v / max(v[g.rep].mean(), 1e-12)
        proxy = mean_loss[None, :] * (0.05 + scale[:, None])  # the offset keeps ties at feature 0 ordered
        q0 = np.full(g.n, max(float(log["reward"].to_numpy().mean()), 1e-9))
        curves.append(_solver_curve(f"dcaf-{f}", g, proxy, q0, sweep))
    for j in range(1, N_RECYCLE + 1):
        curves.append(_fraction_curve(f"static-{j}", g, lambda rng, j=j: j, fractions, seed))
    curves.append(_fraction_curve("random", g, lambda rng: rng.integers(1, N_RECYCLE + 1, g.n), fractions, seed))
    table = []
    for b in budgets:
        row = {"budget_pct": 100 * b}
        for c in curves:
            row[c.name] = c.saved_at(100 * b)
        statics = [row[f"static-{j}"] for j in range(1, N_RECYCLE + 1)]
        row["best static"] = float(np.nanmax(statics)) if not np.isnan(statics).all() else float("nan")
        dcafs = [row[f"dcaf-{f}"] for f in dcaf_features]
        row["best dcaf"] = float(np.nanmax(dcafs)) if dcafs and not np.isnan(dcafs).all() else float("nan")
        if "feature ceiling" in row:
            row["feature ceiling / oracle"] = row["feature ceiling"] / row["oracle"] if row["oracle"] > 0 else float("nan")
        if "comrecycle" in row and row["oracle"] > 0:
            row["comrecycle / oracle"] = row["comrecycle"] / row["oracle"]
        table.append(row)
    # the solver's own budget adherence: solve for b with the predictions, realised loss
    adherence = []
    if dq_hat is not None:
        for b in budgets:
            c = _solver_curve("x", g, dq_hat, q0_pred, [b], estimator_cost)
            adherence.append({"budget_pct": 100 * b, "realised_loss_pct": float(c.loss_pct[-1]),
                              "compute_saved_pct": float(c.saved_pct[-1])})
    return {"curves": {c.name: {"loss_pct": c.loss_pct.tolist(), "saved_pct": c.saved_pct.tolist()} for c in curves},
            "table": table, "adherence": adherence, "requests": g.n, "repeated": int(g.rep.sum()),
            "dcaf_mean_loss_ipw": mean_loss.tolist(), "estimator_cost": estimator_cost}


def write_frontier(res: dict, out: str | Path, title: str = "Compute saved vs effect loss") -> dict[str, Path]:
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = [k for k in res["table"][0] if k != "budget_pct"]
    with open(out / "frontier.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["budget_pct"] + names)
        for row in res["table"]:
            w.writerow([row["budget_pct"]] + [f"{row[k]:.4f}" for k in names])
    lines = [f"# {title}", "", f"{res['requests']:,} requests ({res['repeated']:,} repeated); compute saved % at "
             "equal realised effect loss (exact, from q_j; one-step counterfactual on the logged cache states).", "",
             "| loss budget % | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for row in res["table"]:
        lines.append(f"| {row['budget_pct']:.2f} | " + " | ".join(
            ("—" if np.isnan(row[k]) else f"{row[k]:.3f}" if "/" in k else f"{row[k]:.1f}") for k in names) + " |")
    if res["adherence"]:
        lines += ["", "Budget adherence of the solver with the estimator's predictions:", "",
                  "| budget % | realised loss % | compute saved % |", "|---|---|---|"]
        lines += [f"| {a['budget_pct']:.2f} | {a['realised_loss_pct']:.3f} | {a['compute_saved_pct']:.1f} |"
                  for a in res["adherence"]]
    for name, m in res.get("measured", {}).items():
        lo, hi = m["loss_ci95"]
        lines += ["", f"Measured: **{name}**: {m['saved_pct']:.1f}% compute saved at {m['loss_pct']:.2f}% effect "
                      f"loss [95% CI {lo:.2f}, {hi:.2f}]."]
    lines += ["", "![frontier](frontier.png)"]
    (out / "frontier.md").write_text("\n".join(lines) + "\n")
    (out / "frontier.json").write_text(json.dumps(res, indent=2, default=float) + "\n")

    fig, ax = plt.subplots(figsize=(8, 5.5))
    style = {"comrecycle": dict(color="C0", lw=2.5), "oracle": dict(color="k", ls="--", lw=1.8)}
    right = max([6.0, max(r["budget_pct"] for r in res["table"]) * 1.2]
                + [m["loss_ci95"][1] * 1.1 for m in res.get("measured", {}).values()])
    for i, (name, c) in enumerate(res["curves"].items()):
        x, y = np.array(c["loss_pct"]), np.array(c["saved_pct"])
        o = np.argsort(x, kind="stable")
        x, y = x[o], np.maximum.accumulate(y[o])
        # allowing more loss never saves less: the envelope runs on to the right edge
        x, y = np.append(x, max(right, x[-1])), np.append(y, y[-1])
        kw = style.get(name, dict(color=f"C{i + 1}", lw=1.2, alpha=0.85))
        ax.plot(x, y, label=name, **kw)  # linear: neighbouring points can be mixed
    for k, (name, m) in enumerate(res.get("measured", {}).items()):
        lo, hi = m["loss_ci95"]
        ax.errorbar([m["loss_pct"]], [m["saved_pct"]], xerr=[[m["loss_pct"] - lo], [hi - m["loss_pct"]]],
                    fmt="*", ms=16, color="k", mfc=("gold", "cyan", "lime")[k % 3], capsize=4,
                    label=f"{name} (95% CI)", zorder=5)
    for row in res["table"]:
        ax.axvline(row["budget_pct"], color="grey", lw=0.6, ls=":")
    ax.axvline(1.0, color="red", lw=1.2, ls="-", label="budget b = 1%")
    ax.set_xlim(left=min(-0.5, ax.get_xlim()[0]), right=right)
    ax.set_xlabel("effect loss % (expected clicks vs always-full)")
    ax.set_ylabel("compute saved %")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    plt.close(fig)
    return {"md": out / "frontier.md", "csv": out / "frontier.csv", "png": out / "frontier.png",
            "json": out / "frontier.json"}
