"""Per-state calibration of the estimator's ΔQ̂ by cache depth, fitted on a randomised log.

Why: the Poisson-trained estimator ranks the loss of deep cache states but predicts about
half of it (docs/history.md, "More deep data, longer training, a scale"), so a controller that holds the *predicted* loss at
the budget realises several times the budget. The loss of recycling grows with the number of
pages already served from the reused list, and that depth is known at serving time.

Method (a DR-learner second stage on one feature): for strategy j and depth d (pages served
from the list strategy j reuses; deeper ones pooled at `max_depth`), the doubly-robust
pseudo-outcome of ΔQ_j on a logged repeated request i with arm s_i and propensity p_i is
    Γ_ij = ΔQ̂_ij + 1[s_i = 0] (y_i − Q̂_i0) / p_i − 1[s_i = j] (y_i − Q̂_ij) / p_i
which is unbiased for ΔQ_ij whatever Q̂ is when the propensities are right. Its depth means,
made non-decreasing in depth by a weighted isotonic fit (staler lists never lose less, in
expectation), minus the mean ΔQ̂ of the bucket give an additive offset:
    ΔQ̂_cal[i, j] = ΔQ̂[i, j] + offset[j, depth_ij]        offset: [K, max_depth + 1]
Column 0 (no usable list: depth −1 or 0) is 0. The estimator keeps ranking requests within a
depth; the calibration fixes the level per depth. The same lookup is grafted into the ONNX
graph, so the router gets calibrated `delta_q` (and q_j = q_0 − ΔQ̂_cal) from Triton.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..specs import CACHE_STATE_FIELDS, N_RECYCLE
from ..errors import UserError

PAGES = CACHE_STATE_FIELDS.index("pages")
WIDTH = len(CACHE_STATE_FIELDS)


def depth_of(cache_state: np.ndarray) -> np.ndarray:
    """cache_state [n, K·3] -> pages served from the list each strategy reuses [n, K] (int64;
    ≤ 0 where absent)."""
    cs = np.asarray(cache_state, np.float32).reshape(len(cache_state), N_RECYCLE, WIDTH)
    return np.nan_to_num(cs[:, :, PAGES], nan=-1.0).astype(np.int64)


@dataclass
class DepthCalibration:
    offsets: np.ndarray  # [K, max_depth + 1] float32, column 0 = 0
    report: dict | None = None

    @property
    def max_depth(self) -> int:
        return self.offsets.shape[1] - 1

    def apply(self, q: np.ndarray, dq: np.ndarray, cache_state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(Q [n, K+1], ΔQ̂ [n, K]) -> calibrated (Q, ΔQ̂); Q_0 unchanged, Q_j = Q_0 − ΔQ̂_cal."""
        d = np.clip(depth_of(cache_state), 0, self.max_depth)
        dq = (dq + self.offsets[np.arange(N_RECYCLE)[None, :], d]).astype(np.float32)
        q = np.concatenate([q[:, :1], q[:, :1] - dq], 1).astype(np.float32)
        return q, dq

    def to_json(self) -> str:
        return json.dumps({"kind": "depth_offsets", "offsets": self.offsets.tolist(), "report": self.report},
                          indent=1)

    @classmethod
    def from_json(cls, text: str) -> "DepthCalibration":
        d = json.loads(text)
        if d.get("kind") != "depth_offsets":
            raise UserError(f"calibration: expected kind 'depth_offsets', got {d.get('kind')!r}")
        off = np.asarray(d["offsets"], np.float32)
        if off.ndim != 2 or off.shape[0] != N_RECYCLE or not np.isfinite(off).all():
            raise UserError(f"calibration: expected finite offsets [{N_RECYCLE}, D+1], got shape {off.shape}")
        return cls(off, d.get("report"))


def _pav(y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted non-decreasing isotonic fit (pool adjacent violators)."""
    from sklearn.isotonic import IsotonicRegression

    return IsotonicRegression(increasing=True).fit(np.arange(len(y)), y, sample_weight=w).predict(np.arange(len(y)))


def fit_depth_calibration(q: np.ndarray, dq: np.ndarray, cache_state: np.ndarray, strategy: np.ndarray,
                          reward: np.ndarray, propensity: np.ndarray, max_depth: int = 12,
                          min_rows: int = 400, min_explored: int = 50) -> DepthCalibration:
    """Fit the offsets on repeated requests of a randomised log.

    q [n, K+1], dq [n, K]: the estimator's raw predictions; cache_state [n, K·3]; strategy,
    reward, propensity [n]: the logged arm, its clicks and its logging probability.
    Depths with fewer than `min_rows` usable rows are pooled into the deepest depth that has
    enough (so sparse tails borrow the last well-measured level, never extrapolate). A strategy
    the log served (or left at strategy 0) on fewer than `min_explored` usable rows is not
    calibrated (offsets 0, the reason in the report): its DR pseudo-outcome would rest on the
    estimator alone, so an offset printed for it would measure nothing."""
    n = len(strategy)
    s = np.asarray(strategy, np.int64)
    y = np.asarray(reward, np.float64)
    p = np.asarray(propensity, np.float64)
    if not (len(q) == len(dq) == len(cache_state) == len(y) == len(p) == n):
        raise UserError("calibration: q, dq, cache_state, strategy, reward, propensity must have the same rows")
    if n == 0 or not ((p > 0) & (p <= 1)).all() or not np.isfinite(y).all():
        raise UserError("calibration: need ≥ 1 row, propensities in (0, 1] and finite rewards")
    depth = depth_of(cache_state)
    offsets = np.zeros((N_RECYCLE, max_depth + 1), np.float32)
    report = {"rows": int(n), "strategies": {}}
    for j in range(1, N_RECYCLE + 1):
        d = depth[:, j - 1]
        usable = d >= 1
        corr = ((s == 0) * (y - q[:, 0]) - (s == j) * (y - q[:, j])) / p
        gamma = dq[:, j - 1] + corr
        counts = np.bincount(np.clip(d[usable], 0, max_depth), minlength=max_depth + 1)
        deep = [k for k in range(1, max_depth + 1) if counts[k] >= min_rows]
        n_arm, n_full = int((usable & (s == j)).sum()), int((usable & (s == 0)).sum())
        if min(n_arm, n_full) < min_explored:
            report["strategies"][str(j)] = {
                "skipped": f"not explored: the log served strategy {j} on {n_arm} and strategy 0 on {n_full} of "
                           f"the {int(usable.sum())} requests where strategy {j} was available (fewer than "
                           f"{min_explored}), so its loss cannot be measured", "unexplored": True}
            continue
        if not deep:
            report["strategies"][str(j)] = {"skipped": f"fewer than {min_rows} usable rows at every depth"}
            continue
        top = max(deep)
        dd = np.clip(d, 0, top)
        levels = np.arange(1, top + 1)
        m_gamma, m_pred, w, nrow = [], [], [], []
        for k in levels:
            sel = usable & (dd == k)
            nk = int(sel.sum())
            nrow.append(nk)
            if nk < 2:
                m_gamma.append(0.0), m_pred.append(0.0), w.append(0.0)
                continue
            m_gamma.append(float(gamma[sel].mean()))
            m_pred.append(float(dq[sel, j - 1].mean()))
            w.append(nk / max(float(gamma[sel].var()), 1e-6))  # inverse variance of the bucket mean
        m_gamma, m_pred, w = map(np.asarray, (m_gamma, m_pred, w))
        iso = _pav(m_gamma, np.maximum(w, 1e-12))
        off = iso - m_pred
        offsets[j - 1, 1:top + 1] = off
        offsets[j - 1, top + 1:] = off[-1]
        report["strategies"][str(j)] = {
            "depths": levels.tolist(), "rows": nrow, "dr_mean": np.round(m_gamma, 4).tolist(),
            "dr_se": np.round(np.sqrt(1 / np.maximum(w, 1e-12)), 4).tolist(),
            "isotonic": np.round(iso, 4).tolist(), "predicted_mean": np.round(m_pred, 4).tolist(),
            "offset": np.round(off, 4).tolist()}
    return DepthCalibration(offsets, report)


def graft_calibration(model: onnx.ModelProto, cal: DepthCalibration) -> onnx.ModelProto:
    """Append the depth lookup to an estimator graph with outputs `q`, `delta_q` and input
    `cache_state`: the raw outputs are renamed and the calibrated ones take their names."""
    g = model.graph
    rename = {"q": "q__raw", "delta_q": "delta_q__raw"}
    for node in g.node:
        node.output[:] = [rename.get(o, o) for o in node.output]
        node.input[:] = [rename.get(i, i) for i in node.input]
    D = cal.max_depth
    base = (np.arange(N_RECYCLE, dtype=np.int64) * (D + 1))[None, :]
    inits = [numpy_helper.from_array(cal.offsets.reshape(-1).astype(np.float32), "cal__offsets"),
             numpy_helper.from_array(base, "cal__base"),
             numpy_helper.from_array(np.array([PAGES], np.int64), "cal__start"),
             numpy_helper.from_array(np.array([N_RECYCLE * WIDTH], np.int64), "cal__end"),
             numpy_helper.from_array(np.array([1], np.int64), "cal__axis"),
             numpy_helper.from_array(np.array([WIDTH], np.int64), "cal__step"),
             numpy_helper.from_array(np.array(0.0, np.float32), "cal__lo"),
             numpy_helper.from_array(np.array(float(D), np.float32), "cal__hi"),
             numpy_helper.from_array(np.array([0], np.int64), "cal__zero"),
             numpy_helper.from_array(np.array([1], np.int64), "cal__one")]
    g.initializer.extend(inits)
    g.node.extend([
        helper.make_node("Slice", ["cache_state", "cal__start", "cal__end", "cal__axis", "cal__step"], ["cal__pages"]),
        helper.make_node("Clip", ["cal__pages", "cal__lo", "cal__hi"], ["cal__clipped"]),
        helper.make_node("Cast", ["cal__clipped"], ["cal__depth"], to=TensorProto.INT64),
        helper.make_node("Add", ["cal__depth", "cal__base"], ["cal__flat"]),
        helper.make_node("Gather", ["cal__offsets", "cal__flat"], ["cal__delta"], axis=0),
        helper.make_node("Add", ["delta_q__raw", "cal__delta"], ["delta_q"]),
        helper.make_node("Slice", ["q__raw", "cal__zero", "cal__one", "cal__axis"], ["cal__q0"]),
        helper.make_node("Sub", ["cal__q0", "delta_q"], ["cal__qj"]),
        helper.make_node("Concat", ["cal__q0", "cal__qj"], ["q"], axis=1),
    ])
    return model
