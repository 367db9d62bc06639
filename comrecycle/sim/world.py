"""The static part of the simulated world: catalogue, users and the click model.

Everything is drawn from one seed. Items and users carry arbitrary int64 ids (not 0..N), as
logs from real systems do; the simulator works on dense indices internally.

Click model: p(click | item i viewed, interest s) = sigmoid(ALPHA * <s, v_i> + quality_i + BIAS)
with unit latent vectors s, v_i. A page's effect (its expected clicks) is
sum_p P(position p viewed) * p(click | page[p], s).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

LATENT_DIM = 16
N_CATEGORIES = 40
N_GENDERS, N_AGES, N_COUNTRIES = 2, 6, 20
ALPHA, BIAS = 7.0, -5.6
HISTORY_LEN = 50
PAGE_SIZE = 20
# Users view the first k items of a page, k = 1 + Geometric(VIEW_P), capped by the page:
# P(k < 10) = 1 - (1 - VIEW_P)^9 = 0.70  (≈70% of pages less than half viewed).
VIEW_P = 1.0 - 0.3 ** (1.0 / 9.0)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _unique_ids(rng: np.random.Generator, n: int, low: int) -> np.ndarray:
    """n distinct sorted int64 ids drawn from [low, 2^40)."""
    ids = np.unique(rng.integers(low, 1 << 40, size=int(n * 1.05) + 16, dtype=np.int64))
    while ids.size < n:  # pragma: no cover - collisions are astronomically rare
        ids = np.unique(np.concatenate([ids, rng.integers(low, 1 << 40, size=n, dtype=np.int64)]))
    return np.sort(rng.choice(ids, size=n, replace=False))


@dataclass
class World:
    item_ids: np.ndarray  # [N] int64, sorted
    item_vec: np.ndarray  # [N, D] float32 unit vectors
    item_quality: np.ndarray  # [N] float32
    item_category: np.ndarray  # [N] int16
    user_ids: np.ndarray  # [U] int64, sorted
    user_features: np.ndarray  # [U, 3] int64: gender, age, country
    user_interest: np.ndarray  # [U, D] float32 unit vectors (long-term interest)
    user_activity: np.ndarray  # [U] float64, sums to 1 (who opens sessions)
    initial_history: np.ndarray  # [U, HISTORY_LEN] int64 item indices, -1 padded, most recent first
    seed: int

    @property
    def n_items(self) -> int:
        return self.item_ids.size

    @property
    def n_users(self) -> int:
        return self.user_ids.size

    @classmethod
    def generate(cls, n_items: int = 20_000, n_users: int = 5_000, seed: int = 0) -> "World":
        rng = np.random.default_rng(seed)
        d = LATENT_DIM
        centers = rng.standard_normal((N_CATEGORIES, d))
        category = rng.integers(0, N_CATEGORIES, n_items).astype(np.int16)
        item_vec = _unit(centers[category] + 0.7 * rng.standard_normal((n_items, d))).astype(np.float32)
        item_quality = (0.5 * rng.standard_normal(n_items)).astype(np.float32)

        gender = rng.integers(0, N_GENDERS, n_users)
        age = rng.integers(0, N_AGES, n_users)
        country = np.minimum(rng.zipf(1.6, n_users) - 1, N_COUNTRIES - 1)
        a_g = rng.standard_normal((N_GENDERS, d))
        a_a = rng.standard_normal((N_AGES, d))
        a_c = rng.standard_normal((N_COUNTRIES, d))
        group = _unit(a_g[gender] + a_a[age] + a_c[country])
        user_interest = _unit(1.0 * group + 0.9 * _unit(rng.standard_normal((n_users, d)))).astype(np.float32)
        activity = rng.lognormal(0.0, 1.0, n_users)

        world = cls(
            item_ids=_unique_ids(rng, n_items, 10_000_000),
            item_vec=item_vec,
            item_quality=item_quality,
            item_category=category,
            user_ids=_unique_ids(rng, n_users, 1_000_000),
            user_features=np.stack([gender, age, country], axis=1).astype(np.int64),
            user_interest=user_interest,
            user_activity=activity / activity.sum(),
            initial_history=np.full((n_users, HISTORY_LEN), -1, dtype=np.int64),
            seed=seed,
        )
        world.initial_history = world._sample_past_clicks(rng)
        return world

    def _sample_past_clicks(self, rng: np.random.Generator) -> np.ndarray:
        """Clicks before the log starts: 5..50 items per user drawn from their interest."""
        hist = np.full((self.n_users, HISTORY_LEN), -1, dtype=np.int64)
        lengths = rng.integers(5, HISTORY_LEN + 1, self.n_users)
        for lo in range(0, self.n_users, 512):
            hi = min(lo + 512, self.n_users)
            noisy = _unit(self.user_interest[lo:hi] + 0.5 * rng.standard_normal((hi - lo, LATENT_DIM)))
            logits = self.logits(noisy.astype(np.float32))
            gumbel = rng.gumbel(size=logits.shape).astype(np.float32)
            top = np.argpartition(-(logits + gumbel), HISTORY_LEN, axis=1)[:, :HISTORY_LEN]
            mask = np.arange(HISTORY_LEN)[None, :] < lengths[lo:hi, None]
            hist[lo:hi] = np.where(mask, top, -1)
        return hist

    # ---- click model ---------------------------------------------------------------------
    def logits(self, interest: np.ndarray, items: np.ndarray | None = None) -> np.ndarray:
        """Click logits. interest [B, D]; items None -> [B, N], items [B, L] indices -> [B, L].

        Indices < 0 (unknown or missing items) get -inf (never clicked).
        """
        if items is None:
            return ALPHA * interest.astype(np.float32) @ self.item_vec.T + self.item_quality + np.float32(BIAS)
        safe = np.where(items >= 0, items, 0)
        z = ALPHA * np.einsum("bd,bld->bl", interest, self.item_vec[safe]) + self.item_quality[safe] + BIAS
        return np.where(items >= 0, z, -np.inf)

    def click_prob(self, interest: np.ndarray, items: np.ndarray) -> np.ndarray:
        """[B, L] click probability if viewed; 0 for indices < 0."""
        return 1.0 / (1.0 + np.exp(-self.logits(interest, items)))

    @staticmethod
    def view_prob(page_len: np.ndarray | int, size: int = PAGE_SIZE) -> np.ndarray:
        """P(position p is viewed) for p < size: P(k > p) with k = 1 + Geom(VIEW_P)."""
        p = np.arange(size)
        v = (1.0 - VIEW_P) ** p
        return np.where(p[None, :] < np.asarray(page_len).reshape(-1, 1), v[None, :], 0.0)

    def expected_clicks(self, interest: np.ndarray, pages: np.ndarray,
                        lens: np.ndarray | None = None) -> np.ndarray:
        """Effect of pages [B, L<=PAGE_SIZE] (indices; -1 = unknown or missing item) for
        interests [B, D] -> [B]. lens: items served per page (default: count of indices >= 0)."""
        pages = pages[:, :PAGE_SIZE]
        if lens is None:
            lens = (pages >= 0).sum(axis=1)
        vp = self.view_prob(lens, pages.shape[1])
        return (vp * self.click_prob(interest, pages)).sum(axis=1)

    # ---- id mapping ----------------------------------------------------------------------
    def item_index(self, ids: np.ndarray) -> np.ndarray:
        """External item ids -> indices; unknown ids -> -1 (also for PAD)."""
        return _lookup(self.item_ids, ids)

    def user_index(self, ids: np.ndarray) -> np.ndarray:
        return _lookup(self.user_ids, ids)


def _lookup(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    pos = np.clip(np.searchsorted(sorted_ids, ids), 0, sorted_ids.size - 1)
    return np.where(sorted_ids[pos] == ids, pos, -1).astype(np.int64)
