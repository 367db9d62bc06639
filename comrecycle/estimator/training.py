"""Training the effect-loss estimator (what `comrecycle train-estimator` runs): read randomised
logs, fit the estimator, evaluate it on held-out sessions against a T-learner (gradient-boosted
trees) and the constant model, write the ONNX model, its manifest and the evaluation report
(Markdown + PNG + JSON).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .baselines import ConstantModel, TLearner
from .effect_loss import EffectLossEstimator
from .log_features import LogError, features_from_log, validate_training_log
from .evaluation import evaluate_uplift, treatment_curves
from .uplift_report import plot_uplift_curves, report_markdown


def tabular_features(table: pa.Table) -> np.ndarray:
    """What a tree model can use directly: user codes, request features, history length and
    the cache state (the same information the estimator sees, minus the item ids)."""
    f = features_from_log(table)
    hist_len = (f["history"] >= 0).sum(1, keepdims=True).astype(np.float32)
    return np.concatenate([f["user_features"].astype(np.float32), f["request_features"], hist_len,
                           f["cache_state"]], 1)


def read_training_log(path: str | Path) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise LogError(f"log {path} does not exist")
    try:
        table = pq.read_table(path)
    except Exception as e:  # not Parquet, truncated...
        raise LogError(f"{path}: cannot read as Parquet ({e})") from None
    validate_training_log(table, where=str(path))
    return table


def split_sessions(table: pa.Table, holdout: float, seed: int) -> tuple[pa.Table, pa.Table]:
    sessions = np.unique(table["session_id"].to_numpy())
    rng = np.random.default_rng([seed, 99])
    held = rng.choice(sessions, max(1, int(len(sessions) * holdout)), replace=False)
    mask = pa.array(np.isin(table["session_id"].to_numpy(), held))
    return table.filter(pc.invert(mask)), table.filter(mask)


def read_training_logs(paths) -> pa.Table:
    """One or several randomised logs, concatenated; request and session ids of the i-th log
    are offset by i << 48 so that sessions of different logs never merge."""
    if isinstance(paths, (str, Path)):
        return read_training_log(paths)
    tables = [read_training_log(p) for p in paths]
    if len(tables) == 1:
        return tables[0]
    common = [c for c in tables[0].column_names if all(c in t.column_names for t in tables)]
    out = []
    for i, t in enumerate(tables):
        t = t.select(common)
        for col in ("request_id", "session_id"):
            t = t.set_column(t.column_names.index(col), col, pc.add(t[col], pa.scalar(i << 48, pa.int64())))
        out.append(t)
    try:
        return pa.concat_tables(out)
    except pa.ArrowInvalid as e:
        raise LogError(f"logs {[str(p) for p in paths]} do not share column types ({e})") from None


def train_and_evaluate(logs, out: str | Path, eval_logs: str | Path | None = None,
                       holdout: float = 0.2, seed: int = 0, max_epochs: int = 15,
                       progress: bool = True, baselines: bool = True, min_epochs: int = 0,
                       list_origin: bool = True, label: str = "clicks",
                       average_epochs: int = 0, select: str = "outcome", ensemble: int = 1) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = read_training_logs(logs)
    if eval_logs:
        train, held = table, read_training_log(eval_logs)
    else:
        train, held = split_sessions(table, holdout, seed)
    t0 = time.time()
    est = EffectLossEstimator(seed=seed, max_epochs=max_epochs, min_epochs=min_epochs, progress=progress,
                              list_origin=list_origin, label=label,
                              average_epochs=average_epochs, select=select, ensemble=ensemble).fit(train)
    fit_s = time.time() - t0

    rep = held.filter(pc.equal(held["is_repeat"], True))
    t = rep["strategy"].to_numpy().astype(np.int64)
    y = rep["reward"].to_numpy().astype(np.float64)
    p = rep["propensity"].to_numpy().astype(np.float64)
    q_cols = [f"q_{j}" for j in range(4)]
    q_true = np.stack([rep[c].to_numpy() for c in q_cols], 1) if all(c in rep.column_names for c in q_cols) else None
    preds = {"estimator (GRU+MMoE)": est.predict_log(rep)[1]}
    if baselines:
        tr_rep = train.filter(pc.equal(train["is_repeat"], True))
        Xtr = tabular_features(tr_rep)
        ttr = tr_rep["strategy"].to_numpy().astype(np.int64)
        ytr = tr_rep["reward"].to_numpy().astype(np.float64)
        wtr = 1.0 / tr_rep["propensity"].to_numpy().astype(np.float64)
        Xte = tabular_features(rep)
        preds["T-learner (GBT)"] = TLearner(random_state=seed).fit(Xtr, ttr, ytr, wtr).predict_delta(Xte)
        preds["constant"] = ConstantModel().fit(Xtr, ttr, ytr, wtr).predict_delta(Xte)
    metrics = {name: evaluate_uplift(d, t, y, p, q_true) for name, d in preds.items()}
    curves = {name: treatment_curves(d, t, y, p) for name, d in preds.items()}
    png = plot_uplift_curves(curves, out / "uplift_curves.png", kind="qini",
                             title="Qini curves on held-out randomised requests (score = -predicted loss)")
    logs_name = ", ".join(map(str, logs)) if isinstance(logs, (list, tuple)) else str(logs)
    details = {"training log": logs_name, "held-out": str(eval_logs) if eval_logs else f"{holdout:.0%} of sessions",
               "train repeated requests": est.history_["train_rows"] + est.history_["valid_rows"],
               "held-out repeated requests": rep.num_rows, "training time (s)": round(fit_s, 1),
               "epochs": est.history_["epochs"], "seed": seed, "label": label}
    (out / "report.md").write_text(report_markdown(metrics, details)
                                   + f"\n\n![Qini curves]({png.name})\n")
    (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "details": details}, indent=2, default=float))
    est.save(out, extra={"training_log": logs_name, "fit_seconds": round(fit_s, 1), "details": details})
    return {"metrics": metrics, "details": details, "out": str(out)}
