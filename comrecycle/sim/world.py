"""The static part of the simulated world: catalogue, users and the click model.

Everything is drawn from one seed. Items and users carry arbitrary int64 ids (not 0..N), as
logs from real systems do; the simulator works on dense indices internally.

Click model: p(click | item i viewed, interest s) = sigmoid(ALPHA * <s, v_i> + quality_i + BIAS)
with unit latent vectors s, v_i. A page's effect (its expected clicks) is
sum_p P(position p viewed) * p(click | page[p], s).

Real-time intent (used by env.SessionSimulator): every category has a *related* category, one
of its nearest neighbours (phone -> phone case), and a click on an item moves the session's
interest towards the related category's centre. Users differ in how fast their interest moves
(`user_volatility`): partly by gender, age and country, partly by a latent trait.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..specs import HISTORY_MAX as HISTORY_LEN
from ..specs import N_AGES, N_COUNTRIES, N_GENDERS, PAGE_SIZE
from ..profiles import Profile

LATENT_DIM = 16
N_CATEGORIES = 40
ALPHA, BIAS = 7.0, -5.6
# Users view the first k items of a page, k = 1 + Geometric(VIEW_P), capped by the page:
# P(k < 10) = 1 - (1 - VIEW_P)^9 = 0.70  (≈70% of pages less than half viewed).
VIEW_P = 1.0 - 0.3 ** (1.0 / 9.0)
RELATED_NEIGHBOURS = 3  # a category's related category is one of its 3 nearest other categories
# log user_volatility = gender + age + country effects + latent; the latent part carries
# about half of its variance, so demographics explain some but not all of how users move
VOLATILITY_AGE = np.linspace(0.45, -0.45, 6)  # the young move faster
VOLATILITY_GENDER = np.array([0.15, -0.15])
VOLATILITY_COUNTRY_SD, VOLATILITY_LATENT_SD = 0.25, 0.45


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
    category_center: np.ndarray  # [C, D] float32 unit vectors: the centre items of a category scatter around
    related_category: np.ndarray  # [C] int16: where a click on a category moves the interest (never itself)
    user_volatility: np.ndarray  # [U] float32 > 0, mean ~1: how fast a user's in-session interest moves

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
        related, volatility = _intent_dynamics(np.random.default_rng([seed, 31337]), centers,
                                               gender, age, country)

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
            category_center=_unit(centers).astype(np.float32),
            related_category=related,
            user_volatility=volatility,
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

    def items_of_category(self, category: int) -> np.ndarray:
        """[n] item indices of one category."""
        if not hasattr(self, "_members"):
            order = np.argsort(self.item_category, kind="stable")
            bounds = np.searchsorted(self.item_category[order], np.arange(N_CATEGORIES + 1))
            self._members = [order[bounds[c]:bounds[c + 1]] for c in range(N_CATEGORIES)]
        return self._members[int(category)]

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


def _intent_dynamics(rng: np.random.Generator, centers: np.ndarray, gender: np.ndarray, age: np.ndarray,
                     country: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """related_category [C] (one of each category's RELATED_NEIGHBOURS nearest others by cosine)
    and user_volatility [U] (log-normal, demographic + latent parts, normalised to mean 1)."""
    c = _unit(centers)
    sim = c @ c.T
    np.fill_diagonal(sim, -np.inf)
    nearest = np.argsort(-sim, axis=1)[:, :RELATED_NEIGHBOURS]
    related = nearest[np.arange(len(c)), rng.integers(0, RELATED_NEIGHBOURS, len(c))].astype(np.int16)
    country_effect = VOLATILITY_COUNTRY_SD * rng.standard_normal(N_COUNTRIES)
    log_v = (VOLATILITY_GENDER[gender] + VOLATILITY_AGE[age] + country_effect[country]
             + VOLATILITY_LATENT_SD * rng.standard_normal(gender.size))
    v = np.exp(log_v)
    return related, (v / v.mean()).astype(np.float32)


def _lookup(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    pos = np.clip(np.searchsorted(sorted_ids, ids), 0, sorted_ids.size - 1)
    return np.where(sorted_ids[pos] == ids, pos, -1).astype(np.int64)


def world_for(manifest_or_profile: dict | Profile, seed: int | None = None) -> World:
    """The simulated world a model set was built for."""
    if isinstance(manifest_or_profile, Profile):
        p = manifest_or_profile
        return World.generate(p.n_items, p.n_users, seed=seed or 0)
    w = manifest_or_profile["world"]
    return World.generate(w["n_items"], w["n_users"], seed=w["seed"])
