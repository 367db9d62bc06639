"""Sessions of page requests, simulated in lockstep across many concurrent sessions.

Each of `concurrency` slots holds one live session. A step asks every slot for its next
request, hands the batch to a `serve` function (the in-process cascade, a Triton client,
a logging policy...), then plays the user on what was served: views, clicks, interest drift,
the gap to the next request. Deterministic for a seed and a deterministic `serve`.

Calibration (docs/method.md#simulator): P(repeat) ≈ 0.74 (pages per session = 1 + Geom), gaps ≈46% < 10 s
and ≈75% < 2 min (log-normal), ≈70% of pages less than half viewed (see world.VIEW_P).
Real-time intent (what a cached candidate list misses, and a fresh cascade can see):
  * a click moves the session's interest a little towards the clicked item and more towards
    the centre of its category's *related* category (World.related_category): related but
    different content, which a retrieval from the updated history finds and an old list lacks;
  * a gap brings activity elsewhere in the app: Poisson(volatility * gap / EXTERNAL_CLICK_SECS)
    clicks on one new topic (a category drawn by the user's long-term affinity), which enter the
    click history and pull the interest towards that topic;
  * both shifts scale with the user's volatility (World.user_volatility: demographics + latent);
  * the interest also wanders a little with time (noise no feature shows, which hurts fresh
    and recycled pages alike).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .world import HISTORY_LEN, LATENT_DIM, PAGE_SIZE, VIEW_P, World, _unit
from ..errors import UserError

CONTINUE_PROB = 0.74
MAX_PAGES = 60
# log-normal gap: P(<10 s) = 0.46, P(<120 s) = 0.75  ->  mu, sigma solved in closed form
GAP_MU, GAP_SIGMA = 2.6246, 3.2070
GAP_MIN, GAP_MAX = 0.3, 3600.0
# after clicks: interest += volatility * sum over clicked items of
#   (CLICK_SELF * item vector + CLICK_RELATED * centre of the item's related category)
CLICK_SELF = 0.10
CLICK_RELATED = 0.65
TIME_DRIFT = 0.08  # interest += TIME_DRIFT * sqrt(min(gap, 600) / 60) * noise
# Activity elsewhere in the app during a gap: Poisson(volatility * gap / EXTERNAL_CLICK_SECS)
# clicks (<= EXTERNAL_MAX) on items of one new topic (a category drawn with probability
# ∝ exp(EXTERNAL_AFFINITY * <long-term interest, centre>)). They enter the click history
# (observable by a fresh computation, invisible to a cached list) and move the interest by
# EXTERNAL_SHIFT * volatility per click towards those items.
EXTERNAL_CLICK_SECS = 300.0
EXTERNAL_MAX = 5
EXTERNAL_AFFINITY = 3.0
EXTERNAL_SHIFT = 0.35
EXTERNAL_POOL = 256
SESSION_MOOD = 0.35  # a session starts from the long-term interest plus this much noise


@dataclass
class RequestBatch:
    """B page requests of B distinct live sessions. Ids are external (int64), not indices."""

    slots: np.ndarray  # [B] slot of each request
    request_id: np.ndarray  # [B] int64
    user_index: np.ndarray  # [B] int64 (simulator-internal)
    user_id: np.ndarray  # [B] int64
    session_id: np.ndarray  # [B] int64
    ts: np.ndarray  # [B] float64 seconds
    page: np.ndarray  # [B] int16
    secs_since_prev: np.ndarray  # [B] float32, -1 for the first page
    prev_exposures: np.ndarray  # [B] int32 items viewed on the previous page
    prev_clicks: np.ndarray  # [B] int32
    user_features: np.ndarray  # [B, 3] int64
    history: np.ndarray  # [B, HISTORY_LEN] int64 item ids, most recent first, -1 padded
    exclude: list[np.ndarray]  # B arrays of item ids already exposed in the session
    interest: np.ndarray  # [B, D] the user's true current interest (never shown to a server)

    def __len__(self) -> int:
        return int(self.slots.size)

    @property
    def is_repeat(self) -> np.ndarray:
        return self.page > 0

    @property
    def request_features(self) -> np.ndarray:
        """[B, 4] float32: secs_since_prev, page, prev_exposures, prev_clicks."""
        return np.stack([self.secs_since_prev, self.page.astype(np.float32),
                         self.prev_exposures.astype(np.float32),
                         self.prev_clicks.astype(np.float32)], axis=1).astype(np.float32)

    def history_of(self, i: int) -> np.ndarray:
        h = self.history[i]
        return h[h >= 0]

    def context(self, i: int) -> dict[str, np.ndarray]:
        """Request i as served tensors (names from comrecycle.specs), without batch dim."""
        return {
            "user_id": self.user_id[i:i + 1].astype(np.int64),
            "user_features": self.user_features[i].astype(np.int64),
            "history": self.history_of(i).astype(np.int64),
            "request_features": self.request_features[i],
            "exclude_items": self.exclude[i].astype(np.int64),
        }

    def subset(self, idx: np.ndarray) -> "RequestBatch":
        return RequestBatch(
            slots=self.slots[idx], request_id=self.request_id[idx], user_index=self.user_index[idx],
            user_id=self.user_id[idx], session_id=self.session_id[idx], ts=self.ts[idx],
            page=self.page[idx], secs_since_prev=self.secs_since_prev[idx],
            prev_exposures=self.prev_exposures[idx], prev_clicks=self.prev_clicks[idx],
            user_features=self.user_features[idx], history=self.history[idx],
            exclude=[self.exclude[j] for j in idx], interest=self.interest[idx])


@dataclass
class Outcome:
    """What the simulated users did with the served pages (aligned with the batch)."""

    expected_clicks: np.ndarray  # [B] float32: the page's effect under the true interest
    n_viewed: np.ndarray  # [B] int16
    clicks: np.ndarray  # [B] int32
    page_items: list[np.ndarray]  # served item ids
    clicked_items: list[np.ndarray]


ServeFn = Callable[[RequestBatch], Sequence[np.ndarray]]


class SessionSimulator:
    """Feedback-loop simulator over a World. See module docstring."""

    def __init__(self, world: World, seed: int = 0, concurrency: int = 256,
                 continue_prob: float = CONTINUE_PROB):
        if concurrency < 1 or concurrency > world.n_users:
            raise UserError(f"concurrency must be in [1, n_users={world.n_users}], got {concurrency}")
        self.world = world
        self.rng = np.random.default_rng([seed, 7919])
        self.B = concurrency
        self.continue_prob = continue_prob
        self.history = world.initial_history.copy()  # [U, H] indices
        self.user_last_ts = np.zeros(world.n_users)
        self.user_active = np.zeros(world.n_users, dtype=bool)
        B = concurrency
        self.user = np.full(B, -1, dtype=np.int64)
        self.session_id = np.zeros(B, dtype=np.int64)
        self.page = np.zeros(B, dtype=np.int16)
        self.pages_left = np.zeros(B, dtype=np.int64)
        self.interest = np.zeros((B, LATENT_DIM), dtype=np.float32)
        self.clock = self.rng.uniform(0, 60, B)
        self.secs_since_prev = np.full(B, -1.0, dtype=np.float32)
        self.prev_exposures = np.zeros(B, dtype=np.int32)
        self.prev_clicks = np.zeros(B, dtype=np.int32)
        self.exposed: list[list[np.ndarray]] = [[] for _ in range(B)]
        self.next_request_id = 0
        self.next_session_id = 0
        for s in range(B):
            self._start_session(s)

    # ---- sessions --------------------------------------------------------------------------
    def _start_session(self, s: int) -> None:
        w = self.world
        if self.user[s] >= 0:
            self.user_active[self.user[s]] = False
        while True:  # a user has at most one live session
            u = int(self.rng.choice(w.n_users, p=w.user_activity))
            if not self.user_active[u]:
                break
        self.user_active[u] = True
        self.user[s] = u
        self.session_id[s] = self.next_session_id
        self.next_session_id += 1
        self.page[s] = 0
        self.pages_left[s] = min(1 + self.rng.geometric(1.0 - self.continue_prob) - 1, MAX_PAGES)
        mood = self.rng.standard_normal(LATENT_DIM)
        self.interest[s] = _unit(w.user_interest[u] + SESSION_MOOD * _unit(mood))
        self.clock[s] = max(self.clock[s], self.user_last_ts[u]) + self.rng.exponential(120.0)
        self.secs_since_prev[s] = -1.0
        self.prev_exposures[s] = 0
        self.prev_clicks[s] = 0
        self.exposed[s] = []

    def next_batch(self, limit: int | None = None) -> RequestBatch:
        """The next request of every live session (the first `limit` slots if given)."""
        B = self.B if limit is None else min(limit, self.B)
        slots = np.arange(B)
        w = self.world
        rid = np.arange(self.next_request_id, self.next_request_id + B, dtype=np.int64)
        self.next_request_id += B
        users = self.user[slots]
        hist_idx = self.history[users]
        history = np.where(hist_idx >= 0, w.item_ids[np.maximum(hist_idx, 0)], -1)
        exclude = [w.item_ids[np.concatenate(self.exposed[s])] if self.exposed[s]
                   else np.zeros(0, np.int64) for s in slots]
        return RequestBatch(
            slots=slots, request_id=rid, user_index=users.copy(), user_id=w.user_ids[users],
            session_id=self.session_id[slots].copy(), ts=self.clock[slots].copy(),
            page=self.page[slots].copy(), secs_since_prev=self.secs_since_prev[slots].copy(),
            prev_exposures=self.prev_exposures[slots].copy(), prev_clicks=self.prev_clicks[slots].copy(),
            user_features=w.user_features[users].copy(), history=history, exclude=exclude,
            interest=self.interest[slots].copy())

    def feedback(self, batch: RequestBatch, pages: Sequence[np.ndarray]) -> Outcome:
        """Play the users on the served pages and advance their sessions."""
        if len(pages) != len(batch):
            raise ValueError(f"serve returned {len(pages)} pages for {len(batch)} requests")
        w, rng, B = self.world, self.rng, len(batch)
        page_ids = np.full((B, PAGE_SIZE), -1, dtype=np.int64)
        for i, p in enumerate(pages):
            p = np.asarray(p, dtype=np.int64)[:PAGE_SIZE]
            page_ids[i, :p.size] = p
        page_idx = np.where(page_ids >= 0, w.item_index(page_ids), -1)
        # an item already exposed in this session is not clicked again
        for i, s in enumerate(batch.slots):
            if self.exposed[s]:
                seen = np.isin(page_idx[i], np.concatenate(self.exposed[s]))
                page_idx[i, seen] = -2  # filled slot but worthless
        lens = (page_ids >= 0).sum(axis=1)
        expected = w.expected_clicks(batch.interest, page_idx.clip(min=-1), lens)
        n_view = np.minimum(rng.geometric(VIEW_P, B), lens)
        viewed = np.arange(PAGE_SIZE)[None, :] < n_view[:, None]
        p_click = w.click_prob(batch.interest, page_idx.clip(min=-1))
        clicked = viewed & (rng.random((B, PAGE_SIZE)) < p_click)

        clicked_items, page_items = [], []
        for i, s in enumerate(batch.slots):
            u = batch.user_index[i]
            ci = page_idx[i][clicked[i]]
            if ci.size:  # newest first
                self.history[u] = np.concatenate([ci[::-1], self.history[u]])[:HISTORY_LEN]
                self._click_shift(s, u, ci)
            vi = page_idx[i][viewed[i]]
            vi = vi[vi >= 0]
            if vi.size:
                self.exposed[s].append(vi)
            clicked_items.append(w.item_ids[ci])
            page_items.append(page_ids[i, :lens[i]].copy())
            self.prev_exposures[s] = int(n_view[i])
            self.prev_clicks[s] = int(ci.size)
            self.user_last_ts[u] = self.clock[s]
            # next request of the session, or a new session
            self.pages_left[s] -= 1
            if self.pages_left[s] <= 0:
                self._start_session(s)
                continue
            gap = float(np.clip(rng.lognormal(GAP_MU, GAP_SIGMA), GAP_MIN, GAP_MAX))
            self.clock[s] += gap
            self.secs_since_prev[s] = gap
            self.page[s] += 1
            noise = _unit(rng.standard_normal(LATENT_DIM))
            self.interest[s] = _unit(self.interest[s] + TIME_DRIFT * np.sqrt(min(gap, 600.0) / 60.0) * noise)
            self._external_activity(s, u, gap)
        return Outcome(expected_clicks=expected.astype(np.float32), n_viewed=n_view.astype(np.int16),
                       clicks=clicked.sum(axis=1).astype(np.int32), page_items=page_items,
                       clicked_items=clicked_items)

    def _click_shift(self, s: int, u: int, clicked: np.ndarray) -> None:
        """Clicks on `clicked` (item indices) move the interest towards related content."""
        w = self.world
        related = w.category_center[w.related_category[w.item_category[clicked]]]
        step = CLICK_SELF * w.item_vec[clicked].sum(axis=0) + CLICK_RELATED * related.sum(axis=0)
        self.interest[s] = _unit(self.interest[s] + w.user_volatility[u] * step)

    def _external_activity(self, s: int, u: int, gap: float) -> None:
        """Clicks elsewhere in the app during a gap of `gap` seconds, on one new topic."""
        w = self.world
        n = min(int(self.rng.poisson(w.user_volatility[u] * gap / EXTERNAL_CLICK_SECS)), EXTERNAL_MAX)
        if n == 0:
            return
        affinity = EXTERNAL_AFFINITY * (w.category_center @ w.user_interest[u])
        p = np.exp(affinity - affinity.max())
        topic = self.rng.choice(p.size, p=p / p.sum())
        members = w.items_of_category(topic)
        pool = members[self.rng.integers(0, members.size, min(EXTERNAL_POOL, members.size))]
        z = w.logits(w.category_center[topic][None], pool[None])[0] + self.rng.gumbel(size=pool.size)
        ext = pool[np.argsort(-z)[:n]]
        self.history[u] = np.concatenate([ext, self.history[u]])[:HISTORY_LEN]
        self.interest[s] = _unit(self.interest[s]
                                 + EXTERNAL_SHIFT * w.user_volatility[u] * w.item_vec[ext].sum(axis=0))

    def run(self, n_requests: int, serve: ServeFn, progress: bool = True,
            desc: str = "simulate", on_step: Callable[[RequestBatch, Outcome], None] | None = None
            ) -> "LogBuilder":
        """Simulate n_requests requests served by `serve`; returns the collected log."""
        from tqdm import tqdm

        from .logs import LogBuilder

        log = LogBuilder()
        with tqdm(total=n_requests, desc=desc, unit="req", disable=not progress,
                  mininterval=1.0) as bar:
            done = 0
            while done < n_requests:
                batch = self.next_batch(limit=n_requests - done)
                pages = serve(batch)
                outcome = self.feedback(batch, pages)
                # a recycling server reports what it did (strategy, propensity, cost, q_j)
                # and learns what was exposed
                log.add(batch, outcome, **getattr(serve, "last", {}))
                if hasattr(serve, "on_feedback"):
                    serve.on_feedback(batch, outcome)
                if on_step is not None:
                    on_step(batch, outcome)
                done += len(batch)
                bar.update(len(batch))
        return log


@dataclass
class LoggingPolicy:
    """The 'legacy recommender' that served the bootstrap log: Gumbel-top-k sampling from a
    noisy view of the user's interest (long-term plus in-session), so that logged clicks are
    informative, also about how the in-session intent moves, but the log is not the oracle."""

    world: World
    seed: int = 0
    temperature: float = 1.0
    noise: float = 0.6
    long_term: float = 0.25  # weight of the long-term interest beside the in-session one
    pool: int = 200
    rng: np.random.Generator = field(init=False)

    def __post_init__(self):
        self.rng = np.random.default_rng([self.seed, 104729])

    def __call__(self, batch: RequestBatch) -> list[np.ndarray]:
        w = self.world
        # a previous production system: it followed the in-session intent partly
        guess = (self.long_term * w.user_interest[batch.user_index] + batch.interest
                 + self.noise * self.rng.standard_normal((len(batch), LATENT_DIM)))
        logits = w.logits(_unit(guess).astype(np.float32))
        for i, ex in enumerate(batch.exclude):
            if ex.size:
                logits[i, w.item_index(ex)] = -np.inf
        # sample the page from a pool of the best POOL by the noisy guess (Gumbel top-k)
        pool = np.argpartition(-logits, self.pool, axis=1)[:, :self.pool]
        g = np.take_along_axis(logits, pool, axis=1) / self.temperature + self.rng.gumbel(size=pool.shape)
        top = np.argsort(-g, axis=1)[:, :PAGE_SIZE]
        return list(w.item_ids[np.take_along_axis(pool, top, axis=1)])
