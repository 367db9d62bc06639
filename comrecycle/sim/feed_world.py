"""A second, independent log generator: a feed whose staleness is built unlike the simulator's.

The project's simulator (world.py, env.py) runs the real cascade models on a catalogue of
embedded items, and the loss of a recycled list emerges from the pages it would serve. This
generator shares none of that: no stage models, no embeddings, no click model over positions.
It writes randomised request logs in the contract columns of docs/contracts.md only (no cache_state, no
exposure columns, sparse 40-bit ids, its own unnormalised `cost` column in milliseconds) with
the ground truth q_0..q_3, so that the estimator and the policy can be checked on a world they
were not designed against.

Mechanism (per session, one user; all draws seeded):

- users: gender, age bucket (0..7), country (0..29, Zipf), a topic preference drawn from a
  Dirichlet whose concentration differs per user (diverse or focused readers), an activity
  level (log-normal) and a latent drift;
- the expected clicks of a fresh page: activity · 0.93^page · m, with m ~ Gamma(4)/4 a
  per-request hidden mood that no feature shows;
- staleness of a cached list computed s seconds ago, after b pages without a click since:
      H = drift_u · (1 − exp(−s / 90 s))   (the feed moves on; saturating in time)
        + 0.35 · b                          (pages without a click: the user is bored with it)
        + 0.04 · d²                         (d pages already served from it: a convex depletion)
  drift_u = exp(age effect (U-shaped) + country effect + 0.5 · topic diversity + 0.5 · latent);
  clicks on a list *lower* its staleness (b resets): engagement, unlike the simulator where
  clicks move intent away;
- strategy j reuses the list of stage j − 1 and recomputes the later stages, which fix part of
  its staleness: a fresh retrieval the drift, a fresh ranking the boredom, both some of the
  depletion (KEEP_* below); ΔQ_j = q_0 · (1 − exp(−H_j · ε)) with ε ~ LogNormal(0, 0.4) per
  request (hidden);
- clicks: negative binomial (shape 2) around the served strategy's q, each click an item id of
  a topic drawn from the user's preference (pools of sparse 40-bit ids per topic, Zipf
  popularity); the history is the clicked ids, most recent first;
- gaps between pages: a mixture of fast scrolling (log-normal around 6 s), reading (around
  45 s) and coming back later (around 10 min); a session continues with a probability that
  rises with the clicks of its last page;
- logging: every repeated request draws its strategy at random; a session's probabilities are
  uniform or skewed (propensities vary), written in `propensity`;
- cost: milliseconds, c = (38, 24, 13.5, 3) ms for strategies 0..3 times per-request noise.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .logs import LOG_SCHEMA
from ..errors import UserError

N_TOPICS = 40
TOPIC_POOL = 400  # item ids per topic
HISTORY_MAX = 50
COST_MS = np.array([38.0, 24.0, 13.5, 3.0])
# share of each staleness component that strategy j = 1, 2, 3 keeps (the rest its recomputed stages fix):
# drift needs a fresh retrieval, boredom a fresh ranking, depletion some of both
KEEP_DRIFT = np.array([0.55, 0.8, 1.0])
KEEP_BORED = np.array([0.1, 0.2, 1.0])
KEEP_DEPLETION = np.array([0.3, 0.6, 1.0])
TAU_S = 90.0
BORED_PER_PAGE = 0.35
DEPLETION = 0.04
AGE_EFFECT = np.array([0.5, 0.2, -0.1, -0.3, -0.3, -0.1, 0.2, 0.4])  # U-shaped in age
ARM_WEIGHTS = np.array([[1, 1, 1, 1], [3, 1, 1, 1], [1, 1, 1, 3], [1, 2, 2, 1]], np.float64)


@dataclass(frozen=True)
class FeedWorld:
    seed: int = 0
    n_countries: int = 30

    def log(self, requests: int, log_seed: int | None = None, id_bits: int = 40) -> pa.Table:
        """A randomised log of about `requests` requests (whole sessions), sorted by time."""
        return simulate_feed_log(requests, seed=self.seed if log_seed is None else log_seed,
                                 world_seed=self.seed, n_countries=self.n_countries, id_bits=id_bits)


def _sparse_ids(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    ids = np.unique(rng.integers(1, 2 ** bits, int(n * 1.1) + 16))
    rng.shuffle(ids)
    if len(ids) < n:
        raise RuntimeError("id space too small")
    return ids[:n].astype(np.int64)


def simulate_feed_log(requests: int, seed: int = 0, world_seed: int = 0, n_countries: int = 30,
                      id_bits: int = 40) -> pa.Table:
    """See the module docstring. The world (item pools, country effects) comes from world_seed;
    the users, sessions and draws from seed, so two seeds give two logs of one world."""
    if requests < 1:
        raise UserError(f"requests: expected >= 1, got {requests}")
    wrng = np.random.default_rng([world_seed, 77])
    pools = _sparse_ids(wrng, N_TOPICS * TOPIC_POOL, id_bits).reshape(N_TOPICS, TOPIC_POOL)
    pop = 1.0 / np.arange(1, TOPIC_POOL + 1) ** 0.8
    pop /= pop.sum()
    country_effect = wrng.normal(0.0, 0.3, n_countries)
    rng = np.random.default_rng([seed, 78])
    n_sess = max(1, int(requests / 2.2) + 8)  # whole sessions are kept up to `requests`
    # users: one session each
    user_id = _sparse_ids(rng, n_sess, id_bits)
    gender = rng.integers(0, 2, n_sess)
    age = rng.integers(0, len(AGE_EFFECT), n_sess)
    country = np.minimum(rng.zipf(1.5, n_sess) - 1, n_countries - 1)
    conc = np.exp(rng.normal(-1.0, 1.0, n_sess))  # Dirichlet concentration: focused .. diverse
    pref = rng.gamma(np.repeat(conc[:, None], N_TOPICS, 1))
    pref = np.maximum(pref, 1e-12)
    pref /= pref.sum(1, keepdims=True)
    diversity = -(pref * np.log(pref)).sum(1)
    z_div = (diversity - diversity.mean()) / (diversity.std() + 1e-12)
    drift = np.exp(AGE_EFFECT[age] + country_effect[country] + 0.5 * z_div + 0.5 * rng.standard_normal(n_sess)
                   - 1.3)
    activity = np.exp(rng.normal(np.log(1.0), 0.5, n_sess)) * np.where(gender == 0, 1.0, 1.15)
    arm_w = ARM_WEIGHTS[rng.integers(0, len(ARM_WEIGHTS), n_sess)]
    arm_p = arm_w / arm_w.sum(1, keepdims=True)
    cumpref = np.cumsum(pref, 1)

    def draw_items(sess_idx: np.ndarray) -> np.ndarray:
        u = rng.random(len(sess_idx))
        topic = np.minimum((cumpref[sess_idx] < u[:, None]).sum(1), N_TOPICS - 1)
        return pools[topic, rng.choice(TOPIC_POOL, len(sess_idx), p=pop)]

    # long-term history: 5..50 earlier clicks
    hist = np.full((n_sess, HISTORY_MAX), -1, np.int64)
    h_len = rng.integers(5, HISTORY_MAX + 1, n_sess)
    rows = np.repeat(np.arange(n_sess), h_len)
    items = draw_items(rows)
    pos = np.concatenate([np.arange(k) for k in h_len])
    hist[rows, pos] = items
    # session state; per stage (retrieval, prerank, rank) list: computed at time, pages served, idle pages
    t_now = rng.uniform(0, 86_400.0, n_sess)
    list_t = np.zeros((n_sess, 3))
    list_d = np.zeros((n_sess, 3))
    list_b = np.zeros((n_sess, 3))
    prev_clicks = np.zeros(n_sess, np.int64)
    prev_exp = np.zeros(n_sess, np.int64)
    gap = np.full(n_sess, -1.0)
    alive = np.ones(n_sess, bool)
    cols: dict[str, list] = {k: [] for k in ("sess", "ts", "page", "gap", "pe", "pc", "hist", "s", "p", "r", "cost",
                                              "q")}
    page = 0
    while alive.any():
        idx = np.flatnonzero(alive)
        n = len(idx)
        mood = rng.gamma(4.0, 0.25, n)
        q0 = activity[idx] * 0.93 ** page * mood
        q = np.repeat(q0[:, None], 4, 1)
        if page > 0:
            age_s = t_now[idx, None] - list_t[idx]
            H = (KEEP_DRIFT * drift[idx, None] * (1 - np.exp(-age_s / TAU_S))
                 + KEEP_BORED * BORED_PER_PAGE * list_b[idx] + KEEP_DEPLETION * DEPLETION * list_d[idx] ** 2)
            eps = np.exp(rng.normal(0.0, 0.4, (n, 1)))
            q[:, 1:] = q0[:, None] * np.exp(-H * eps)
            u = rng.random(n)
            s = np.minimum((np.cumsum(arm_p[idx], 1) < u[:, None]).sum(1), 3)
            p = arm_p[idx, s]
        else:
            s = np.zeros(n, np.int64)
            p = np.ones(n)
        mean = q[np.arange(n), s]
        clicks = rng.poisson(rng.gamma(2.0, mean / 2.0))
        viewed = np.minimum(20, 4 + rng.poisson(6 + 3 * clicks))
        cost = COST_MS[s] * np.exp(rng.normal(0.0, 0.1, n))
        cols["sess"].append(idx)
        cols["ts"].append(t_now[idx].copy())
        cols["page"].append(np.full(n, page))
        cols["gap"].append(gap[idx].copy())
        cols["pe"].append(prev_exp[idx].copy())
        cols["pc"].append(prev_clicks[idx].copy())
        cols["hist"].append(hist[idx].copy())
        cols["s"].append(s)
        cols["p"].append(p)
        cols["r"].append(clicks)
        cols["cost"].append(cost)
        if page == 0:
            q[:, 1:] = np.nan  # nothing cached yet
        cols["q"].append(q)
        # the lists stage j >= s recomputed are fresh; the reused ones served one more page
        fresh = np.arange(3)[None, :] >= s[:, None]  # stage k (0 retrieval, 1 prerank, 2 rank) recomputed?
        # strategy s reuses the lists of stages < s, i.e. stage k is fresh iff k >= s
        lt, ld, lb = list_t[idx], list_d[idx], list_b[idx]
        lt[fresh] = t_now[idx, None].repeat(3, 1)[fresh]
        ld[fresh] = 0
        lb[fresh] = 0
        ld += 1
        lb = np.where(clicks[:, None] > 0, 0.0, lb + 1)
        list_t[idx], list_d[idx], list_b[idx] = lt, ld, lb
        # history: this page's clicks, most recent first
        k = np.minimum(clicks, HISTORY_MAX)
        if k.sum():
            new_rows = np.repeat(np.arange(n), k)
            new_items = draw_items(idx[new_rows])
            h = hist[idx]
            for i in np.flatnonzero(k):
                c = new_items[new_rows == i]
                h[i] = np.concatenate([c, h[i]])[:HISTORY_MAX]
            hist[idx] = h
        prev_clicks[idx] = clicks
        prev_exp[idx] = viewed
        cont = rng.random(n) < np.clip(0.62 + 0.08 * clicks, 0, 0.9)
        alive[idx[~cont]] = False
        mix = rng.random(n)
        g = np.where(mix < 0.5, rng.lognormal(np.log(6.0), 0.6, n),
                     np.where(mix < 0.85, rng.lognormal(np.log(45.0), 0.7, n), rng.lognormal(np.log(600.0), 0.9, n)))
        gap[idx] = g
        t_now[idx] += g
        page += 1
    sess = np.concatenate(cols["sess"])
    # whole sessions, in the order they were drawn, up to `requests` requests
    per_sess = np.bincount(sess, minlength=n_sess)
    n_keep = max(1, int(np.searchsorted(np.cumsum(per_sess), requests, side="right")))
    keep = sess < n_keep
    hist_rows = np.concatenate(cols["hist"])
    lens = (hist_rows >= 0).sum(1)
    flat = hist_rows[hist_rows >= 0]
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    q = np.concatenate(cols["q"])
    page_arr = np.concatenate(cols["page"])
    order = np.lexsort((np.arange(len(sess)), np.concatenate(cols["ts"])))
    order = order[keep[order]]
    table = pa.table({
        "request_id": pa.array(np.arange(len(sess), dtype=np.int64)),
        "user_id": pa.array(user_id[sess]),
        "session_id": pa.array(user_id[sess] ^ np.int64(seed * 1_000_003 + 17)),
        "ts": pa.array(np.concatenate(cols["ts"])),
        "page": pa.array(page_arr.astype(np.int16)),
        "is_repeat": pa.array(page_arr > 0),
        "gender": pa.array(gender[sess].astype(np.int8)),
        "age": pa.array(age[sess].astype(np.int8)),
        "country": pa.array(country[sess].astype(np.int16)),
        "secs_since_prev": pa.array(np.concatenate(cols["gap"]).astype(np.float32)),
        "prev_exposures": pa.array(np.concatenate(cols["pe"]).astype(np.int32)),
        "prev_clicks": pa.array(np.concatenate(cols["pc"]).astype(np.int32)),
        "history": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.int64())),
        "strategy": pa.array(np.concatenate(cols["s"]).astype(np.int8)),
        "propensity": pa.array(np.concatenate(cols["p"]).astype(np.float32)),
        "reward": pa.array(np.concatenate(cols["r"]).astype(np.float32)),
        "cost": pa.array(np.concatenate(cols["cost"]).astype(np.float32)),
        **{f"q_{j}": pa.array(q[:, j].astype(np.float32)) for j in range(4)},
    })
    table = table.take(pa.array(order))
    # request ids in time order, as a serving log numbers them
    table = table.set_column(0, "request_id", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    assert table.schema.field("history").type == LOG_SCHEMA.field("history").type
    return table
