"""Training labels for the effect-loss estimator: observed clicks, or view-adjusted clicks.

A page's clicks are a noisy measure of its effect (expected clicks). In the simulator more
than half of that noise comes from how far the user scrolled, which does not depend on the
page's content: users examine the first k positions, k drawn independently of the items (the
position-based examination model that production systems fit as a position-bias curve).
That part can be removed without bias by a control variate:

    y_i = clicks_i − Σ_k (V_ik − v_k(L_i)) · p̂_ik

    V_ik      1 if position k of page i was viewed (the first n_viewed positions)
    v_k(L)    P(position k viewed | page of L items), estimated from the same log
    p̂_ik      click-per-view rate of the item at position k, estimated from the other rows

E[V_ik − v_k(L_i)] = 0 whatever the page holds, so E[y_i | page] = E[clicks_i | page] for any
p̂ that does not use row i's own outcome (hence the leave-one-row-out rate). The closer p̂ is
to the true click probability, the more of the scrolling noise goes: on the 280k uniform log
the noise variance drops from 5.25 to 1.92 clicks² (docs/RESULTS.md, "View-adjusted labels"). What remains is the
click noise on the viewed items, about Σ_k V_k p_k (1 − p_k).

The correction can make y negative, so the estimator regresses this label with squared error
(a Poisson loss is unbounded below on negative labels; estimator.py).

Needs the exposure columns a serving log carries (`n_viewed`, `page_items`, `clicked_items`).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..specs import N_RECYCLE, PAGE_SIZE
from ..errors import UserError

# the logged rewards a label (and an off-policy estimate) can be built from
LABELS = ("clicks", "view-adjusted")
# "true-q": the simulator's exact expected clicks q_0..q_K of every strategy (columns q_j, NaN
# where a cache is absent), all arms of each request at once, no noise. A diagnostic, not a way
# to deploy: no real log has q_j. Fitted with the estimator's architecture and inputs it gives
# the feature ceiling of those inputs (docs/evaluation.md#oracle-and-feature-ceiling).
TRUE_Q = "true-q"
ESTIMATOR_LABELS = LABELS + (TRUE_Q,)
EXPOSURE_COLUMNS = ("n_viewed", "page_items", "clicked_items")
# views of prior weight pulling a rarely seen item's click rate to the log's mean rate
CTR_PRIOR_VIEWS = 20.0


def examination_curve(page_len: np.ndarray, n_viewed: np.ndarray, size: int = PAGE_SIZE) -> np.ndarray:
    """[size] S(k) = P(the user examines beyond position k), from pages of any length.

    page_len, n_viewed [n]. A page of L items caps the depth at L, so only pages with L > k
    say whether the depth exceeded k (a censored survival estimate). Positions no page
    reached get 0.
    """
    page_len = np.asarray(page_len, np.int64)
    n_viewed = np.asarray(n_viewed, np.int64)
    k = np.arange(size)
    at_risk = (page_len[:, None] > k[None, :]).sum(0)
    beyond = (n_viewed[:, None] > k[None, :]).sum(0)
    return np.where(at_risk > 0, beyond / np.maximum(at_risk, 1), 0.0)


def view_adjusted_clicks(page_items: list, n_viewed: np.ndarray, clicked_items: list,
                         prior_views: float = CTR_PRIOR_VIEWS) -> tuple[np.ndarray, dict]:
    """y [n] view-adjusted clicks of each page, and a summary of the fit.

    page_items    n arrays of the served item ids, in page order
    n_viewed [n]  positions viewed (the first n_viewed of the page)
    clicked_items n arrays of the clicked ids (each must be on its page, within the viewed part)
    """
    n = len(page_items)
    if not (len(clicked_items) == n == len(n_viewed)):
        raise UserError(f"view-adjusted labels: page_items, n_viewed and clicked_items must have the same "
                         f"rows, got {n}, {len(n_viewed)} and {len(clicked_items)}")
    n_viewed = np.asarray(n_viewed, np.int64)
    lens = np.fromiter((len(p) for p in page_items), np.int64, n)
    if ((n_viewed < 0) | (n_viewed > lens)).any():
        bad = int(np.flatnonzero((n_viewed < 0) | (n_viewed > lens))[0])
        raise UserError(f"view-adjusted labels: n_viewed must be in 0..len(page_items); row {bad} has "
                         f"n_viewed {int(n_viewed[bad])} for a page of {int(lens[bad])} items")
    if n == 0 or lens.sum() == 0:
        return np.zeros(n, np.float32), {"rows": n, "views": 0}
    row = np.repeat(np.arange(n), lens)
    pos = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    ids = np.concatenate([np.asarray(p, np.int64) for p in page_items])
    viewed = pos < n_viewed[row]
    clicked = _clicked_mask(ids, row, clicked_items, n)
    if (clicked & ~viewed).any():
        bad = int(row[np.flatnonzero(clicked & ~viewed)[0]])
        raise UserError(f"view-adjusted labels: row {bad} has a click outside its first n_viewed "
                         f"({int(n_viewed[bad])}) positions")
    curve = examination_curve(lens, n_viewed, max(PAGE_SIZE, int(lens.max())))
    views_total = float(viewed.sum())
    mean_ctr = float(clicked.sum()) / views_total if views_total else 0.0
    uniq, item = np.unique(ids, return_inverse=True)
    item_views = np.bincount(item, weights=viewed, minlength=uniq.size)
    item_clicks = np.bincount(item, weights=clicked, minlength=uniq.size)
    # leave this row out: its own click must not enter its control variate
    p_hat = ((item_clicks[item] - clicked + prior_views * mean_ctr)
             / (item_views[item] - viewed + prior_views))
    correction = np.bincount(row, weights=(viewed - curve[pos]) * p_hat, minlength=n)
    clicks = np.bincount(row, weights=clicked, minlength=n)
    y = clicks - correction
    return y.astype(np.float32), {"rows": n, "views": int(views_total), "mean_ctr": mean_ctr,
                                  "examination_curve": curve[:PAGE_SIZE].round(4).tolist()}


def _clicked_mask(ids: np.ndarray, row: np.ndarray, clicked_items: list, n: int) -> np.ndarray:
    """[total page slots] True where the slot's item is among its row's clicked ids."""
    clens = np.fromiter((len(c) for c in clicked_items), np.int64, n)
    if clens.sum() == 0:
        return np.zeros(ids.size, bool)
    crow = np.repeat(np.arange(n), clens)
    cids = np.concatenate([np.asarray(c, np.int64) for c in clicked_items if len(c)])
    # (row, item) as one int64 key: items by their rank among all ids seen (< 2^31)
    _, inv = np.unique(np.concatenate([ids, cids]), return_inverse=True)
    slot_key = row * (1 << 31) + inv[:ids.size]
    click_key = np.unique(crow * (1 << 31) + inv[ids.size:])
    hit = np.isin(slot_key, click_key)
    missing = click_key.size - np.unique(slot_key[hit]).size
    if missing:
        raise UserError(f"view-adjusted labels: {missing} clicked item(s) are not on the page they were "
                         f"clicked on")
    return hit


def training_labels(table: pa.Table, label: str = "clicks") -> tuple[np.ndarray, dict]:
    """y [rows of table] for the estimator: the logged clicks, or the view-adjusted clicks
    (which need the exposure columns; the item rates are estimated over the whole table);
    for "true-q", y [rows, K+1] is the q_j columns (NaN where unknown)."""
    if label not in ESTIMATOR_LABELS:
        raise UserError(f"label must be one of {ESTIMATOR_LABELS}, got {label!r}")
    if label == TRUE_Q:
        missing = [f"q_{j}" for j in range(N_RECYCLE + 1) if f"q_{j}" not in table.column_names]
        if missing:
            raise UserError(f"label 'true-q' needs the ground-truth columns q_0..q_{N_RECYCLE} of a simulator log; "
                            f"the log lacks {missing} (write one with `comrecycle simulate --logging random`)")
        y = np.stack([table[f"q_{j}"].to_numpy(zero_copy_only=False).astype(np.float32)
                      for j in range(N_RECYCLE + 1)], 1)
        return y, {"label": TRUE_Q, "rows_with_q0": int(np.isfinite(y[:, 0]).sum())}
    if label == "clicks":
        return table["reward"].to_numpy().astype(np.float32), {"label": "clicks"}
    missing = [c for c in EXPOSURE_COLUMNS if c not in table.column_names]
    if missing:
        raise UserError(f"view-adjusted labels need the exposure columns {list(EXPOSURE_COLUMNS)}; the log "
                         f"lacks {missing} (train with --label clicks, or log the viewed and clicked items)")
    y, info = view_adjusted_clicks(table["page_items"].to_pylist(), table["n_viewed"].to_numpy(),
                                   table["clicked_items"].to_pylist())
    return y, {"label": label, **info}
