"""Uplift curves as a PNG and metrics as a Markdown table (the estimator's evaluation report);
the metrics themselves: estimator.evaluation."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import UserError
from .evaluation import SIGN_CONVENTION, STRATEGY_NAMES


def _treatment_label(j: int) -> str:
    name = STRATEGY_NAMES.get(j)
    return f"j={j} ({name})" if name else f"j={j}"


def plot_uplift_curves(results_by_model: dict, path_png, kind: str = "qini", title: str | None = None,
                       max_points: int = 2000) -> Path:
    """One panel per treatment: each model's curve (divided by n, so its area is the metric)
    against the fraction of requests targeted, plus the random line.

    results_by_model: {model name: {j: {"fraction": [m+1], "qini": [m+1], "uplift": [m+1]}}}
    (the output of `treatment_curves` per model); kind: "qini" or "uplift".
    Writes a PNG with the Agg backend (no global pyplot state) and returns its path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if kind not in ("qini", "uplift"):
        raise UserError(f"kind: expected 'qini' or 'uplift', got {kind!r}")
    if not results_by_model:
        raise UserError("results_by_model: expected at least one model, got none")
    treatments = sorted({j for curves in results_by_model.values() for j in curves})
    fig = Figure(figsize=(4.6 * len(treatments), 4.2), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(treatments), squeeze=False)[0]
    colors = [f"C{i % 10}" for i in range(len(results_by_model))]
    for ax, j in zip(axes, treatments):
        ends = []
        for color, (name, curves) in zip(colors, results_by_model.items()):
            if j not in curves:
                continue
            c = curves[j]
            frac, v = np.asarray(c["fraction"]), np.asarray(c[kind])
            rows = frac.size - 1
            idx = np.unique(np.linspace(0, rows, min(rows + 1, max_points + 1)).astype(np.int64))
            ax.plot(frac[idx], v[idx] / rows, color=color, lw=1.6, label=name)
            ends.append((color, name, float(v[-1] / rows)))
        if len({round(e, 12) for _, _, e in ends}) == 1:
            ax.plot([0, 1], [0, ends[0][2]], color="0.3", ls="--", lw=1.2, label="random", zorder=3)
        else:  # models evaluated on different rows: one random line each
            for color, name, e in ends:
                ax.plot([0, 1], [0, e], color=color, ls="--", lw=1.0, label=f"random ({name})", zorder=3)
        ax.axhline(0.0, color="0.8", lw=0.8, zorder=0)
        ax.set_title(f"{_treatment_label(j)} vs full (j=0)")
        ax.set_xlabel("fraction of requests targeted (by -ΔQ̂, least loss first)")
        ax.set_ylabel(f"{'Qini' if kind == 'qini' else 'uplift'}(k) / n  [clicks per request]")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title or f"{'Qini' if kind == 'qini' else 'Uplift'} curves of the effect-loss estimators "
                 "(uplift = E[y|t=j] - E[y|t=0] = -ΔQ_j)")
    path = Path(path_png)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# (key, title, definition, reference rows: [(key, label)] that depend on the data only)
_REPORT_METRICS = [
    ("auuc", "AUUC",
     "Area under the uplift curve (rows ranked by -ΔQ̂_j, uplift(k) = (ȳ_t - ȳ_c in the top k) · k) "
     "over the fraction targeted, divided by n. Higher is better; `random` = a random ranking "
     "(τ̂_j / 2), `oracle` = ranking by the true -ΔQ_j (needs ground truth).",
     [("auuc_random", "random"), ("auuc_oracle", "oracle (true ΔQ)")]),
    ("qini", "Qini coefficient",
     "Area between the Qini curve (Y_t(k) - Y_c(k) · N_t(k)/N_c(k)) and the random line, divided by n; "
     "0 = random, higher is better.",
     [("qini_oracle", "oracle (true ΔQ)")]),
    ("spearman", "Spearman rank correlation",
     "Of ΔQ̂_j with the true ΔQ_j = q_0 - q_j over the rows where the truth exists (1 = perfect ranking).", []),
    ("kendall", "Kendall's tau", "As Spearman, with Kendall's tau-b.", []),
    ("calibration_slope", "Calibration slope",
     "OLS slope of the true ΔQ_j on ΔQ̂_j (1 = calibrated scale; n/a when ΔQ̂_j is constant).", []),
    ("mae", "Mean absolute error", "Mean |ΔQ̂_j - ΔQ_j| in clicks per request (lower is better).", []),
]


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v):.4g}"


def report_markdown(metrics_by_model: dict, extra: dict | None = None) -> str:
    """A short Markdown report: one table per metric (rows = models, columns = treatments),
    each introduced by a sentence defining it. Data-only reference rows (random, oracle, rows,
    average uplift) are shown once when every model was evaluated on the same data.

    metrics_by_model: {model name: evaluate_uplift(...) output}; extra: {label: value} shown
    as a bullet list of run details (log, seeds, ...).
    """
    if not metrics_by_model:
        raise UserError("metrics_by_model: expected at least one model, got none")
    models = list(metrics_by_model)
    per = {m: {int(j): r for j, r in metrics_by_model[m]["per_treatment"].items()} for m in models}
    treatments = sorted({j for m in models for j in per[m]})
    head = "| | " + " | ".join(_treatment_label(j) for j in treatments) + " |"
    sep = "|---|" + "---|" * len(treatments)

    def cell(m, j, key):
        return _fmt(per[m].get(j, {}).get(key))

    def row(label, m, key):
        return f"| {label} | " + " | ".join(cell(m, j, key) for j in treatments) + " |"

    def reference_rows(key, label):
        if not any(key in per[m].get(j, {}) for m in models for j in treatments):
            return []
        vals = {tuple(cell(m, j, key) for j in treatments) for m in models}
        if len(vals) == 1:
            return [row(label, models[0], key)]
        return [row(f"{label} ({m})", m, key) for m in models]

    lines = ["# Effect-loss estimator: uplift evaluation", "",
             f"Sign convention: {SIGN_CONVENTION}. Uplift metrics use the randomised rows with "
             "t in {0, j}; curves and areas are in clicks per request (divided by n).", ""]
    if extra:
        lines += ["## Run", ""] + [f"- {k}: {v}" for k, v in extra.items()] + [""]
    lines += ["## Data", "",
              "Rows with t = j and t = 0, and the estimated average uplift τ̂_j = E[y|t=j] - E[y|t=0] "
              "(IPW-weighted when propensities are given; = -average loss).", "", head, sep]
    lines += reference_rows("n_treated", "rows t=j") + reference_rows("n_control", "rows t=0")
    lines += reference_rows("uplift_mean", "τ̂_j") + [""]
    for key, title, definition, refs in _REPORT_METRICS:
        if not any(key in per[m].get(j, {}) for m in models for j in treatments):
            continue
        lines += [f"## {title}", "", definition, "", head, sep]
        lines += [row(m, m, key) for m in models]
        for rkey, label in refs:
            lines += reference_rows(rkey, label)
        lines.append("")
    return "\n".join(lines)
