"""How a user's cache entry changes: the feedback of the previous page (`apply_feedback`: viewed
items leave the lists; the request filter's cache state and availability) and a served page
(`next_entry`). Pure functions on router.entry.CacheEntry, used by the router (router.core) and by
the simulator (sim.recycling.StageCache) alike."""
from __future__ import annotations

import numpy as np

from ..specs import CACHE_STATE_FIELDS, EXCLUDE_MAX, N_RECYCLE, PAD_ID, PAGE_SIZE, STAGES, STRATEGIES
from .entry import CACHED_STAGES, RECENT_PAGES, CacheEntry, StageList

N_STRATEGIES = len(STRATEGIES)
# the cached list strategy j reads
READS = {j: (STAGES[j - 1] if j > 0 else None) for j in STRATEGIES}
RECENT_PAGES_MAX = RECENT_PAGES * PAGE_SIZE


def isin(items: np.ndarray, small: np.ndarray) -> np.ndarray:
    """np.isin(items, small) for integer ids, by binary search in the sorted `small` (cheaper
    than np.isin's set machinery, or a broadcast compare, at a page's size against a list)."""
    return in_sorted(items, np.sort(small))


def in_sorted(items: np.ndarray, sorted_small: np.ndarray) -> np.ndarray:
    if sorted_small.size == 0 or items.size == 0:
        return np.zeros(items.shape, bool)
    idx = np.searchsorted(sorted_small, items)
    idx[idx == sorted_small.size] = 0
    return sorted_small[idx] == items


def apply_feedback(entry: CacheEntry, viewed: np.ndarray, clicked: np.ndarray, now: float,
                   ttl_s: float, parked: np.ndarray | None = None,
                   hold: np.ndarray | None = None) -> tuple[CacheEntry, np.ndarray, np.ndarray, np.ndarray]:
    """The request filter's view of a valid entry after the previous page's feedback.

    Viewed items (the request's own and those parked by busy requests of the user) leave every
    cached list and join the session's exposed items, as reported: they can only narrow this
    user's own lists. The request features count the request's own viewed items and its clicks on
    the user's recent pages. `hold`: items held back from recycling (pages whose feedback has not
    arrived): they stay in the lists but the cache state and availability count without them.
    Returns (entry with the lists updated, request_features [4], cache_state [3K], available [K+1])."""
    gone = np.unique(viewed if parked is None or not parked.size else np.concatenate([viewed, parked]))
    n_clicked = np.intersect1d(clicked, entry.last_page).size if clicked.size else 0
    lists = {s: StageList(lst.items[~in_sorted(lst.items, gone)] if gone.size else lst.items, lst.ts, lst.pages)
             for s, lst in entry.lists.items()}
    fresh = gone[~in_sorted(gone, np.sort(entry.exposed))] if entry.exposed.size else gone
    exposed = np.concatenate([entry.exposed, fresh])[-EXCLUDE_MAX:]
    new = CacheEntry(entry.model_version, entry.last_ts, entry.page, exposed, entry.last_page, lists)
    feats = np.array([now - entry.last_ts, entry.page, np.unique(viewed).size, n_clicked], np.float32)
    state = np.full((N_RECYCLE, len(CACHE_STATE_FIELDS)), -1, np.float32)
    avail = np.zeros(N_STRATEGIES, bool)
    avail[0] = True
    held_back = np.sort(hold) if hold is not None and hold.size else None
    for j in range(1, N_STRATEGIES):
        lst = lists.get(READS[j])
        if lst is None:
            continue
        left = lst.items.size if held_back is None else int((~in_sorted(lst.items, held_back)).sum())
        if left > 0 and now - lst.ts <= ttl_s:
            state[j - 1] = (now - lst.ts, lst.pages, left)
            avail[j] = True
    return new, feats, state.reshape(-1), avail


def next_entry(before: CacheEntry | None, strategy: int, outputs: dict[str, np.ndarray], page: np.ndarray,
               now: float, model_version: str) -> CacheEntry:
    """The entry after serving `page` by `strategy`: the stages it computed replace their
    lists (1 page served); the others have served one more page."""
    lists = {} if before is None else dict(before.lists)
    for s in CACHED_STAGES:
        key = f"{s}_items"
        if key in outputs:
            items = outputs[key]
            lists[s] = StageList(items[items != PAD_ID].astype(np.int64), now, 1)
        elif s in lists:
            lst = lists[s]
            lists[s] = StageList(lst.items, lst.ts, lst.pages + 1)
    exposed = np.zeros(0, np.int64) if before is None else before.exposed
    n_page = 0 if before is None else before.page
    recent = page.astype(np.int64) if before is None else np.concatenate([page, before.last_page]).astype(np.int64)
    return CacheEntry(model_version, float(now), n_page + 1, exposed, recent[:RECENT_PAGES_MAX], lists)


def recent_unique(*parts: np.ndarray, limit: int = EXCLUDE_MAX) -> np.ndarray:
    """The ids of `parts` (oldest first), each once at its latest position, the `limit` most
    recent: what strategy 0 excludes (exclude_items takes at most EXCLUDE_MAX ids)."""
    ids = np.concatenate([np.asarray(p, np.int64) for p in parts]) if parts else np.zeros(0, np.int64)
    if ids.size == 0:
        return ids
    rev = ids[::-1]
    _, first = np.unique(rev, return_index=True)  # first occurrence from the end = the latest
    latest = rev[np.sort(first)][::-1]
    return latest[-limit:]
