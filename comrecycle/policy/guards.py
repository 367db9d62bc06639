"""The simulator's calibration guards (README "The simulator"): does the world pose the
trade-off that recycling has to decide?

Measured on a randomised recycling log with ground truth q_0..q_3 (NaN where the cache a
strategy reads was unavailable), i.e. `comrecycle simulate --logging random`:

  loss_s3            strategy 3 on every repeat with a rank list: 1 - Σ q_3 / Σ q_0      (5-15%)
  top10_share        share of that loss carried by the top 10% of those repeats by ΔQ_3   (>= 40%;
                     None, so failed, when the net loss is not positive; top10_share_of_gross
                     divides by the sum of the positive ΔQ_3 instead, a figure that noise cannot inflate)
  dq3_one_page       mean ΔQ_3 where the rank list has served one page                    (> 0)
  mean_dq            mean ΔQ_1, ΔQ_2, ΔQ_3 on the repeats where all three are available (ordered)
  r2_cache, r2_all   out-of-fold R² of ΔQ_3 by gradient boosting from the cache state alone, and
                     from it plus previous clicks, gap, exposures, user features, history length
                     (r2_all - r2_cache >= 0.15)
  dq3_by_*           mean ΔQ_3 by previous clicks (0 / 1 / 2+), gap (<10 s / 10-120 s / >120 s) and
                     pages the rank list has served (1 / 2 / 3+): where the loss comes from
  oracle_s12_share   share of repeats for which the oracle (true ΔQ, the project's solver) at a
                     1% loss budget picks strategy 1 or 2, with the given costs c_j       (>= 3%)
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..specs import CACHE_STATE, N_RECYCLE, USER_FEATURE_NAMES
from ..errors import UserError

# (name, test, text) of each guard; `check` fills in the values
GUARDS = (
    ("loss_s3", lambda v: 0.05 <= v <= 0.15, "strategy 3 on every repeat with a rank list loses 5-15%"),
    ("top10_share", lambda v: v >= 0.40, "top 10% of repeats by ΔQ_3 carry >= 40% of the loss"),
    ("dq3_one_page", lambda v: bool(v > 0.0), "mean ΔQ_3 > 0 where the rank list has served one page"),
    ("dq_ordered", lambda v: bool(v), "on average ΔQ_1 <= ΔQ_2 <= ΔQ_3"),
    ("r2_gain", lambda v: v >= 0.15, "features beyond the cache state add >= 0.15 R² of ΔQ_3"),
    ("oracle_s12_share", lambda v: v >= 0.03, "the oracle at b = 1% picks strategy 1 or 2 for >= 3% of repeats"),
)


def _q(log: pa.Table) -> np.ndarray:
    cols = [f"q_{j}" for j in range(N_RECYCLE + 1)]
    missing = [c for c in cols if c not in log.column_names]
    if missing:
        raise UserError(f"the calibration guards need the ground-truth columns {cols}; missing {missing} "
                         f"(write the log with `comrecycle simulate --logging random`)")
    q = np.stack([log[c].to_numpy(zero_copy_only=False).astype(np.float64) for c in cols], 1)
    rep = log["is_repeat"].to_numpy()
    if not np.isfinite(q[rep, 1:]).any():
        raise UserError(f"the calibration guards need q_1..q_{N_RECYCLE} on repeated requests; this log has none "
                         f"({int(rep.sum())} repeats; a --logging full log carries q_0 only): write it with "
                         f"`comrecycle simulate --logging random`")
    return q


def _cache_state(log: pa.Table, required: bool = True) -> np.ndarray:
    """[n, 3K]; a log without the column (a contract-only log) gives -1 (absent) unless required."""
    width = CACHE_STATE.dims[0]
    if "cache_state" not in log.column_names:
        if required:
            raise UserError("the calibration guards need the `cache_state` column of a recycling log")
        return np.full((log.num_rows, width), -1.0, np.float32)
    return log["cache_state"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


# the observable features of the R² guard (and of the feature ceiling, policy.frontier)
OBSERVABLE_EXTRA = ("prev_clicks", "secs_since_prev", "prev_exposures", "gender", "age", "country", "history_len")


def _extra(columns: dict[str, np.ndarray], history_len: np.ndarray) -> np.ndarray:
    """[n, len(OBSERVABLE_EXTRA)] float64 in OBSERVABLE_EXTRA's order."""
    return np.stack([np.asarray(columns[n], np.float64) for n in OBSERVABLE_EXTRA[:-1]]
                    + [np.asarray(history_len, np.float64)], 1)


def observable_features(log: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(cache state [n, 3K], extra [n, len(OBSERVABLE_EXTRA)]) float64: what a router sees of a request
    (the cache state is -1 everywhere for a log without it)."""
    hist_len = pc.list_value_length(log["history"]).to_numpy(zero_copy_only=False)
    extra = _extra({n: log[n].to_numpy(zero_copy_only=False) for n in OBSERVABLE_EXTRA[:-1]}, hist_len)
    return _cache_state(log, required=False).astype(np.float64), extra


def observable_features_of_batch(batch, cache_state: np.ndarray) -> np.ndarray:
    """[B, 3K + len(OBSERVABLE_EXTRA)] float64: observable_features (concatenated) of a live
    simulator batch (sim.env.RequestBatch) and its cache state [B, 3K], as a log of it would give."""
    user = np.asarray(batch.user_features)
    columns = {"prev_clicks": batch.prev_clicks, "secs_since_prev": batch.secs_since_prev,
               "prev_exposures": batch.prev_exposures,
               **{name: user[:, k] for k, name in enumerate(USER_FEATURE_NAMES)}}
    extra = _extra(columns, (np.asarray(batch.history) >= 0).sum(1))
    return np.concatenate([np.asarray(cache_state, np.float64), extra], 1)


def noisy_target_regressor(seed: int = 0):
    """Gradient boosting regularised for a noisy target: shallow trees, large leaves, early stopping."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    return HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=100,
                                         l2_regularization=1.0, early_stopping=True, random_state=seed)


def _oof_r2(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int) -> float:
    from sklearn.model_selection import GroupKFold, cross_val_predict

    pred = cross_val_predict(noisy_target_regressor(seed), x, y, groups=groups, cv=GroupKFold(5))
    return float(1.0 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2))


def guard_figures(log: pa.Table, costs, budget: float = 0.01, seed: int = 0) -> dict:
    """The figures of every guard (see module docstring) plus `checks`: name -> passed."""
    from .solver import solve_loss_budget

    q = _q(log)
    rep = log["is_repeat"].to_numpy()
    cs = _cache_state(log).reshape(log.num_rows, N_RECYCLE, 3)  # age_s, pages, items per strategy 1..K
    has3 = rep & np.isfinite(q[:, 3])
    dq = q[:, :1] - q
    d3 = dq[has3, 3]
    loss_s3 = 1.0 - q[has3, 3].sum() / q[has3, 0].sum()
    top = np.sort(d3)[::-1][:max(d3.size // 10, 1)]
    one_page = has3 & (cs[:, 2, 1] == 1)
    all3 = rep & np.isfinite(q[:, 1:]).all(1)
    mean_dq = dq[all3, 1:].mean(0)

    state, extra = observable_features(log)
    state, extra = state[has3], extra[has3]
    groups = log["user_id"].to_numpy()[has3]
    r2_cache = _oof_r2(state, d3, groups, seed)
    r2_all = _oof_r2(np.concatenate([state, extra], 1), d3, groups, seed)

    avail = np.isfinite(q) & rep[:, None]
    avail[:, 0] = True
    dq_solver = np.where(avail, dq, 0.0)
    total_q0 = q[:, 0].sum()
    sol = solve_loss_budget(np.asarray(costs, np.float64), dq_solver[rep], q[rep, 0],
                            budget * total_q0 / q[rep, 0].sum(), avail[rep])
    counts = np.bincount(sol.strategy, minlength=N_RECYCLE + 1)
    prev_clicks, gap = log["prev_clicks"].to_numpy()[has3], log["secs_since_prev"].to_numpy()[has3]
    pages3 = cs[has3, 2, 1]

    def means(masks) -> list[float | None]:
        return [float(d3[m].mean()) if m.any() else None for m in masks]

    out = {
        "requests": int(log.num_rows), "repeats": int(rep.sum()), "repeats_with_rank_list": int(has3.sum()),
        "loss_s3": float(loss_s3),
        # a share of a net loss that is not positive means nothing: None, which fails the guard
        "top10_share": float(top.sum() / d3.sum()) if d3.sum() > 0 else None,
        "top10_share_of_gross": float(top.clip(min=0).sum() / max(d3.clip(min=0).sum(), 1e-12)),
        "dq3_one_page": float(dq[one_page, 3].mean()) if one_page.any() else None,
        "one_page_rows": int(one_page.sum()),
        "dq3_by_prev_clicks": means([prev_clicks == 0, prev_clicks == 1, prev_clicks >= 2]),
        "dq3_by_gap": means([gap < 10, (gap >= 10) & (gap <= 120), gap > 120]),
        "dq3_by_pages": means([pages3 == 1, pages3 == 2, pages3 >= 3]),
        "mean_dq": [float(v) for v in mean_dq], "mean_q0": float(q[rep, 0].mean()),
        "dq_ordered": bool(mean_dq[0] <= mean_dq[1] <= mean_dq[2]),
        "r2_cache": r2_cache, "r2_all": r2_all, "r2_gain": r2_all - r2_cache,
        "costs": [float(c) for c in costs], "budget": budget,
        "oracle_mix": (counts / max(rep.sum(), 1)).tolist(),
        "oracle_s12_share": float((counts[1] + counts[2]) / max(rep.sum(), 1)),
        "oracle_saved_pct": 100.0 * (1.0 - (np.asarray(costs)[sol.strategy].sum() + (~rep).sum())
                                     / log.num_rows),
    }
    out["checks"] = {name: out[name] is not None and bool(test(out[name])) for name, test, _ in GUARDS}
    return out


def guard_markdown(fig: dict) -> str:
    lines = [f"{fig['requests']} requests, {fig['repeats']} repeats ({fig['repeats_with_rank_list']} with a rank list)",
             "", "| guard | value | holds |", "|---|---|---|"]
    show = {"loss_s3": f"{100 * fig['loss_s3']:.2f}%",
            "top10_share": "n/a (no net loss)" if fig["top10_share"] is None else f"{100 * fig['top10_share']:.1f}%",
            "dq3_one_page": (f"{fig['dq3_one_page']:.4f}" if fig["dq3_one_page"] is not None else "n/a")
                            + f" clicks ({fig['one_page_rows']} rows)",
            "dq_ordered": "ΔQ_1..3 = " + " / ".join(f"{v:.4f}" for v in fig["mean_dq"])
                          + f" (q_0 {fig['mean_q0']:.3f})",
            "r2_gain": f"{fig['r2_all']:.3f} - {fig['r2_cache']:.3f} = {fig['r2_gain']:.3f}",
            "oracle_s12_share": f"{100 * fig['oracle_s12_share']:.1f}% (mix "
                                + " / ".join(f"{100 * v:.1f}" for v in fig["oracle_mix"])
                                + f", saved {fig['oracle_saved_pct']:.1f}%)"}
    for name, _, text in GUARDS:
        lines.append(f"| {text} | {show[name]} | {'yes' if fig['checks'][name] else 'NO'} |")
    fmt = lambda v: " / ".join("n/a" if x is None else f"{x:.3f}" for x in v)  # noqa: E731
    lines += ["", f"Top 10% share of the gross loss (positive ΔQ_3 only): {100 * fig['top10_share_of_gross']:.1f}%. "
              f"Mean ΔQ_3 by previous clicks 0 / 1 / 2+: {fmt(fig['dq3_by_prev_clicks'])}; by gap "
              f"<10 s / 10-120 s / >120 s: {fmt(fig['dq3_by_gap'])}; by pages the rank list served "
              f"1 / 2 / 3+: {fmt(fig['dq3_by_pages'])}."]
    return "\n".join(lines)
