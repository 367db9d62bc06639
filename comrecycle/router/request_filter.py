"""A request's way into the router: its tensors checked (`parse_request`), then the request filter
(docs/method.md): what it may recycle, from the user's cache entry as its claim returned it and
the previous page's feedback it brings."""
from __future__ import annotations

import numpy as np

from ..rule import allowed_strategies, depth_guard
from .batch import TIME_MAX, BatchReport, RouterRequest
from .entry import CacheEntry
from .params import RouterParams
from ..runtime.validation import InputError, check_tensor
from ..specs import PAD_ID, ROUTER, ROUTER_INPUTS
from .state import apply_feedback, in_sorted, recent_unique

def parse_request(tensors: dict[str, np.ndarray], now: float, request_time_window_s: float = 0.0
                  ) -> tuple[RouterRequest, np.ndarray, np.ndarray, bool]:
    """One request's tensors (batch dim 1) -> (RouterRequest, viewed, clicked, new_session);
    InputError if invalid. request_time_window_s > 0: request_time must be that close to `now`."""
    for spec in ROUTER_INPUTS:
        value = tensors.get(spec.name)
        if value is None and spec.optional:
            continue
        if check_tensor(ROUTER, spec, value) != 1:
            raise InputError(f"model '{ROUTER}', input '{spec.name}': {ROUTER} serves one page per "
                             f"request: expected batch size 1, got {value.shape[0]}")
    t = tensors.get("request_time")
    ns = tensors.get("new_session")
    if ns is not None and int(ns[0, 0]) not in (0, 1):
        raise InputError(f"model '{ROUTER}', input 'new_session': expected 0 or 1, got {int(ns[0, 0])}")
    if t is not None:
        t = float(t[0, 0])
        if not 0.0 <= t <= TIME_MAX:  # also NaN; the spec already refuses ±inf
            raise InputError(f"model '{ROUTER}', input 'request_time': expected seconds in [0, {TIME_MAX:g}] "
                             f"(Unix time or a replay's clock), got {t:g}")
        if request_time_window_s > 0 and abs(t - now) > request_time_window_s:
            raise InputError(f"model '{ROUTER}', input 'request_time': expected a time within "
                             f"{request_time_window_s:g} s of the server clock ({now:.3f}), got {t:.3f}")
    hist = tensors["history"][0]
    req = RouterRequest(user_id=int(tensors["user_id"][0, 0]), user_features=tensors["user_features"][0],
               history=hist[hist != PAD_ID], now=t if t is not None else now)
    token = tensors.get("page_token")
    req.token_in = int(token[0, 0]) if token is not None else None
    viewed, clicked = tensors["viewed_items"][0], tensors["clicked_items"][0]
    return req, viewed[viewed != PAD_ID], clicked[clicked != PAD_ID], bool(ns is not None and ns[0, 0] == 1)


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
