"""The router's request filter (docs/method.md): what a request may recycle, from the user's cache
entry as its claim returned it and the previous page's feedback it brings."""
from __future__ import annotations

import numpy as np

from ..rule import allowed_strategies, depth_guard
from .batch import TIME_MAX, BatchReport, RouterRequest
from .entry import CacheEntry
from .params import RouterParams
from .state import apply_feedback, in_sorted, recent_unique

def request_filter(r: RouterRequest, claim, report: BatchReport, *, model_version: str, ttl_s: float,
                   session_ttl_s: float, params: RouterParams) -> None:
    """The request's view of the user's state after its claim (new sessions: none): its entry
    with the feedback applied, request features, cache state and available strategies
    (under the params' depth guard and certified family); r.repeated when it may recycle."""
    if r.new_session:  # served by the fresh call; its entry is written if the claim holds the lock
        report.cache[claim.status if claim.status in ("busy", "error") else "new_session"] += 1
        return
    status = claim.status
    e = claim.entry
    if status == "busy":
        # strategy 0, excluding everything known to be exposed (read without the lock); its
        # viewed items were parked by the claim for the next request under the lock
        if r.viewed.size:
            report.parked_feedback += 1
        known = ([e.exposed] if e is not None else []) + [claim.pending, r.undelivered, r.exposed]
        r.exposed = recent_unique(*known)
    elif status == "hit" and e is not None:
        if not 0.0 <= e.last_ts <= TIME_MAX:  # written by a build without the request_time rules
            status, e = "corrupt", None
        elif r.now - e.last_ts > session_ttl_s:
            status, e = "expired", None
        elif e.model_version != model_version:
            # lists of other models are not recycled; the session (exposed items, pages) goes on
            status = "stale_version"
            e = CacheEntry(model_version, e.last_ts, e.page, e.exposed, e.last_page, {})
    report.cache[status] += 1
    if status in ("busy", "error"):
        return
    if e is None:  # miss, corrupt, expired: initial; the viewed items it reports (+ parked) are kept
        exposed = recent_unique(claim.pending, r.undelivered, r.viewed)
        r.entry = CacheEntry(model_version, r.now, 0, exposed, np.zeros(0, np.int64), {})
        r.exposed = exposed
        return
    if r.now < e.last_ts:  # a client clock that went back: ages are never negative
        report.time_clamped += 1
        r.now = e.last_ts
    # `last_page` holds the items of the pages served since the last one whose feedback arrived.
    # Feedback about the latest page (or without a token) settles them; about an older page (a
    # burst of requests), they stay held back from recycled pages until it does.
    settled = r.token_in is None or r.token_in == e.page
    if not settled:
        report.feedback_mismatch += 1
    r.entry, r.request_features, r.cache_state, r.available = apply_feedback(
        e, r.viewed, r.clicked, r.now, ttl_s, parked=np.concatenate([claim.pending, r.undelivered]),
        hold=None if settled else e.last_page)
    if settled:
        r.entry.last_page = np.zeros(0, np.int64)
        r.recyclable = {s: lst.items for s, lst in r.entry.lists.items()}
    else:
        held_back = np.sort(r.entry.last_page)
        r.recyclable = {s: lst.items[~in_sorted(lst.items, held_back)] for s, lst in r.entry.lists.items()}
    if params.max_pages:
        r.available = depth_guard(r.available[None], r.cache_state[None], params.max_pages)[0]
    if params.strategies is not None:  # the family λ was certified for
        r.available = allowed_strategies(r.available[None], params.strategies)[0]
    r.exposed = r.entry.exposed
    r.repeated = True
