"""Recycling inside the simulator: the per-user stage cache a served system keeps, and a
`serve` function that answers repeated requests by any strategy 0-3 (docs/method.md) with
the same ONNX stage models Triton serves (in-process onnxruntime).

Cache semantics (the router's own functions, router.core.next_entry and apply_feedback):
  * after a request, each stage output that was computed is written back;
  * the items the user viewed (exposed) are removed from every cached list of that user;
  * strategy j > 0 reads the cached output of STAGES[j-1] and runs STAGES[j:] on it;
  * a first page (initial request) starts from an empty cache and always uses strategy 0;
  * an entry older than the TTL is treated as absent (the request filter's "expired").
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from ..router.entry import CacheEntry
from ..router.state import READS, apply_feedback, next_entry
from ..runtime.cascade import InProcessCascade
from ..settings import SERVING
from ..specs import PAGE_SIZE, STAGES, STRATEGIES
from .env import Outcome, RequestBatch
from .world import World
from ..errors import UserError

N_STRATEGIES = len(STRATEGIES)


class StageCache:
    """user index -> the router's cache entry (router.cache.CacheEntry), kept by the router's own
    functions: `next_entry` after a served page, `apply_feedback` for the exposure and for what
    the request filter sees (cache state, availability). One implementation of the cache's
    semantics for the router (in Redis) and the simulator (in memory)."""

    VERSION = "simulator"

    def __init__(self, ttl_s: float = SERVING.cache_ttl_s):
        self.ttl_s = float(ttl_s)
        self.entries: dict[int, CacheEntry] = {}

    def clear(self, user: int) -> None:
        self.entries.pop(int(user), None)

    def write(self, user: int, outputs: dict[str, np.ndarray], ts: float = 0.0) -> None:
        """After a served request: the stages it computed replace their lists (1 page served
        from them); the lists it did not recompute have served one more page."""
        page = np.asarray(outputs.get("rerank_items", _EMPTY), np.int64)[:PAGE_SIZE]
        self.entries[int(user)] = next_entry(self.entries.get(int(user)), -1, outputs, page, float(ts), self.VERSION)

    def remove_exposed(self, user: int, viewed: np.ndarray) -> None:
        e = self.entries.get(int(user))
        if e is None or viewed.size == 0:
            return
        self.entries[int(user)] = apply_feedback(e, np.asarray(viewed, np.int64), _EMPTY, e.last_ts, self.ttl_s)[0]

    def view(self, user: int, now: float) -> tuple[np.ndarray, np.ndarray]:
        """(cache_state [3K] float32, available [K+1] bool) of the user's entry at `now`, as the
        router's request filter computes them (specs.CACHE_STATE; -1s where unavailable)."""
        e = self.entries.get(int(user))
        if e is None:
            return np.full(3 * (N_STRATEGIES - 1), -1, np.float32), np.eye(1, N_STRATEGIES, dtype=bool)[0]
        _, _, state, avail = apply_feedback(e, _EMPTY, _EMPTY, float(now), self.ttl_s)
        return state, avail

    def state(self, user: int, now: float) -> np.ndarray:
        """[K*3] float32, the estimator's `cache_state`: age in seconds, pages served, items left
        of the list each strategy 1..K reads; -1s where unavailable."""
        return self.view(user, now)[0]

    def candidates(self, user: int, strategy: int, now: float | None = None) -> np.ndarray | None:
        """The cached list strategy j reads, or None (absent, emptied by exposure, expired)."""
        stage = READS[strategy]  # the stage whose cached list strategy j reads (None: the full cascade)
        e = self.entries.get(int(user))
        if stage is None or e is None or stage not in e.lists:
            return None
        if now is not None and not self.view(user, now)[1][strategy]:
            return None
        items = e.lists[stage].items
        return items if items.size else None


_EMPTY = np.zeros(0, np.int64)


def page_expected_clicks(world: World, interests: np.ndarray, pages: list[np.ndarray]) -> np.ndarray:
    """[B] exact expected clicks of B pages (item ids, best first) for interests [B, D]: the
    q_j of a strategy's page (no discount for items already exposed in the session)."""
    mat = np.full((len(pages), 20), -1, np.int64)
    for r, p in enumerate(pages):
        ids = world.item_index(np.asarray(p, np.int64)[:20])
        mat[r, :ids.size] = ids
    return world.expected_clicks(interests, mat, (mat != -1).sum(axis=1))


# assign(batch, available[B, K+1] bool, cache_state[B, 3K]) -> (strategy [B], propensity [B])
AssignFn = Callable[[RequestBatch, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def uniform_random_assignment(seed: int, weights=None) -> AssignFn:
    """Repeated requests: a strategy drawn among the available ones, uniformly (propensity
    1/#available) or with probability proportional to `weights` [K+1] (propensity
    w_j / Σ_available w); initial requests: strategy 0 with propensity 1.

    Non-uniform weights that favour strategy 3 explore deep caches: the rank list is rewritten
    by strategies 0-2, so under uniform logging it is rarely more than two pages old, while a
    policy that recycles reads it much older.

    `weights` may also be [M, K+1], a mixture: each session uses one row, picked by a seeded
    hash of its session id (so every page of a session uses the same row). The logged
    propensity is the probability under that row, which is the true assignment probability
    given the session's row; the row is independent of the outcomes, so IPW stays unbiased,
    and a row that favours strategy 3 yields long runs of recycling (deep caches) while a
    uniform row keeps every strategy explored."""
    rng = np.random.default_rng([seed, 424242])
    w = None if weights is None else np.atleast_2d(np.asarray(weights, np.float64))
    if w is not None and (w.ndim != 2 or w.shape[1] != N_STRATEGIES or w.shape[0] < 1
                          or not np.isfinite(w).all() or (w <= 0).any()):
        raise UserError(f"arm weights: expected rows of {N_STRATEGIES} positive numbers, got {weights}")

    def row_of(session_id: int) -> np.ndarray:
        if w.shape[0] == 1:
            return w[0]
        h = np.random.default_rng([seed, 77, int(session_id) & 0x7FFFFFFFFFFFFFFF]).integers(w.shape[0])
        return w[h]

    def assign(batch: RequestBatch, available: np.ndarray, cache_state: np.ndarray | None = None):
        B = len(batch)
        strategy = np.zeros(B, np.int8)
        propensity = np.ones(B, np.float32)
        for i in range(B):
            if not batch.is_repeat[i]:
                continue
            opts = np.flatnonzero(available[i])
            if w is None:
                strategy[i] = rng.choice(opts)
                propensity[i] = 1.0 / opts.size
            else:
                wi = row_of(batch.session_id[i])
                p = wi[opts] / wi[opts].sum()
                k = rng.choice(opts.size, p=p)
                strategy[i], propensity[i] = opts[k], p[k]
        return strategy, propensity

    return assign


def fixed_assignment(strategy: int) -> AssignFn:
    """Every repeated request by `strategy` when its cache allows, else strategy 0."""

    def assign(batch: RequestBatch, available: np.ndarray, cache_state: np.ndarray | None = None):
        s = np.where(batch.is_repeat & available[:, strategy], strategy, 0).astype(np.int8)
        return s, np.ones(len(batch), np.float32)

    return assign


def random_assignment(p: float, seed: int = 0) -> AssignFn:
    """The random-recycling baseline: each repeated request recycles with probability p, by a
    uniformly random available recycling strategy; otherwise (or when none is available) 0."""
    rng = np.random.default_rng([seed, 17])

    def assign(batch: RequestBatch, available: np.ndarray, cache_state: np.ndarray | None = None):
        avail = available[:, 1:] & np.asarray(batch.is_repeat)[:, None]
        u = rng.random(avail.shape) * avail  # a random available one: the largest draw
        pick = np.where(avail.any(1) & (rng.random(len(batch)) < p), 1 + u.argmax(1), 0)
        return pick.astype(np.int8), np.ones(len(batch), np.float32)

    return assign


class RecyclingServer:
    """A simulator `serve` function with a per-user stage cache.

    counterfactuals=True also runs every available strategy for every repeated request and
    records q_j = the exact expected clicks of strategy j's page (NaN where unavailable);
    only the assigned strategy's page is served and written back to the cache.
    """

    def __init__(self, world: World, cascade: InProcessCascade, assign: AssignFn,
                 strategy_cost: dict[int, float] | None = None, counterfactuals: bool | tuple[int, ...] = False):
        """counterfactuals: True (every strategy), False (the served one), or the strategies
        whose q_j to compute besides the served one."""
        self.world, self.cascade, self.assign = world, cascade, assign
        self.cost = strategy_cost or {j: 1.0 if j == 0 else float("nan") for j in STRATEGIES}
        if counterfactuals is True:
            counterfactuals = tuple(STRATEGIES)
        self.counterfactuals = tuple(counterfactuals or ())
        self.cache = StageCache()
        self.last: dict[str, np.ndarray] = {}

    def availability(self, batch: RequestBatch) -> np.ndarray:
        return self._views(batch)[1]

    def _views(self, batch: RequestBatch) -> tuple[np.ndarray, np.ndarray]:
        """(cache_state [B, 3K], available [B, K+1]) of a batch, as the router's request filter
        sees them (initial requests: nothing available but strategy 0)."""
        views = [self.cache.view(batch.user_index[i], batch.ts[i]) for i in range(len(batch))]
        state = np.stack([v[0] for v in views]) if views else np.zeros((0, 3 * (N_STRATEGIES - 1)), np.float32)
        avail = np.stack([v[1] for v in views]) if views else np.zeros((0, N_STRATEGIES), bool)
        avail[~np.asarray(batch.is_repeat, bool), 1:] = False
        return state, avail

    def expected_clicks(self, batch: RequestBatch, idx: np.ndarray, j: int) -> np.ndarray:
        """[len(idx)] exact expected clicks of strategy j's page for requests idx."""
        return self._page_clicks(batch, idx, self._run(batch, idx, j))

    def _page_clicks(self, batch: RequestBatch, idx: np.ndarray, outs: list) -> np.ndarray:
        """Expected clicks of the pages in `outs` (one per request of idx); errors re-raised."""
        for o in outs:
            if isinstance(o, Exception):
                raise o
        return page_expected_clicks(self.world, batch.interest[idx], [o["rerank_items"] for o in outs])

    def _run(self, batch: RequestBatch, idx: np.ndarray, j: int) -> list[dict]:
        ctxs = [batch.context(i) for i in idx]
        cands = None if j == 0 else [self.cache.candidates(batch.user_index[i], j, batch.ts[i]) for i in idx]
        return self.cascade.run(ctxs, strategy=j, candidates=cands)

    def __call__(self, batch: RequestBatch) -> list[np.ndarray]:
        B = len(batch)
        for i in range(B):
            if not batch.is_repeat[i]:
                self.cache.clear(batch.user_index[i])
        cache_state, avail = self._views(batch)
        strategy, propensity = self.assign(batch, avail, cache_state)
        if not avail[np.arange(B), strategy].all():
            raise ValueError("assignment chose a strategy whose cache is unavailable")
        q = np.full((B, N_STRATEGIES), np.nan, np.float32)
        served: list[dict | None] = [None] * B
        for j in range(N_STRATEGIES):
            if j in self.counterfactuals:
                idx = np.flatnonzero((avail[:, j] & (batch.is_repeat | (j == 0))) | (strategy == j))
            else:
                idx = np.flatnonzero(strategy == j)
            if idx.size == 0:
                continue
            outs = self._run(batch, idx, j)
            q[idx, j] = self._page_clicks(batch, idx, outs)
            for r, o in enumerate(outs):
                if strategy[idx[r]] == j:
                    served[idx[r]] = o
        # an assignment may ask that the cache keep what another strategy would have left
        # (shadow exploration: a refresh drawn by exploration is served but not written back)
        cache_as = getattr(self.assign, "cache_as", None)
        for i in range(B):
            out = served[i]
            if cache_as is not None and cache_as[i] > strategy[i]:
                keep = {f"{s}_items" for s in STAGES[int(cache_as[i]):-1]}
                out = {k: v for k, v in out.items() if k in keep}
            self.cache.write(batch.user_index[i], out, batch.ts[i])
        self.last = {"strategy": strategy, "propensity": propensity, "q": q, "cache_state": cache_state,
                     "cost": np.array([self.cost[int(s)] for s in strategy], np.float32)}
        return [o["rerank_items"] for o in served]

    def on_feedback(self, batch: RequestBatch, outcome: Outcome) -> None:
        """Exposure: remove the viewed items from the user's cached lists."""
        for i in range(len(batch)):
            viewed = outcome.page_items[i][:int(outcome.n_viewed[i])]
            self.cache.remove_exposed(batch.user_index[i], viewed)


def load_model_set(model_dir) -> tuple[World, InProcessCascade, dict[int, float]]:
    """The world a model set was built for, its in-process cascade and its strategy costs c_j."""
    import json
    from pathlib import Path

    from .world import world_for

    model_dir = Path(model_dir)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    costs = json.loads((model_dir / "cost_profile.json").read_text())["strategy_cost"]
    return world_for(manifest), InProcessCascade.load(model_dir), {int(k): float(v) for k, v in costs.items()}


def simulate_log(model_dir, n_requests: int, seed: int = 0, logging: str = "random",
                 concurrency: int = 256, progress: bool = True, strategy: int | None = None,
                 arm_weights=None, counterfactuals: bool = True, progress_queue=None):
    """A request log served by the model set in `model_dir` with the recycling cache.

    logging="random": repeated requests get a uniformly random available strategy (propensity
    logged) and every strategy's q_j is computed; "full": strategy 0 everywhere (q_0 only);
    strategy=j: every repeated request recycled by j when its cache allows (q_0 and q_j).
    counterfactuals=False with random logging computes q_j of the served strategy only
    (a training log: the estimator learns from observed clicks; several times faster when
    the weights favour the cheap strategies).
    """
    from .env import SessionSimulator

    world, cascade, costs = load_model_set(model_dir)
    if strategy is not None:
        assign, cf = fixed_assignment(strategy), (0, strategy)
    elif logging == "random":
        assign, cf = uniform_random_assignment(seed, arm_weights), bool(counterfactuals)
    elif logging == "full":
        assign, cf = fixed_assignment(0), (0,)
    else:
        raise UserError(f"logging must be 'random' or 'full', got {logging!r}")
    server = RecyclingServer(world, cascade, assign, costs, counterfactuals=cf)
    sim = SessionSimulator(world, seed=seed, concurrency=min(concurrency, world.n_users // 2))
    on_step = None if progress_queue is None else (lambda batch, outcome: progress_queue.put(len(batch)))
    return sim.run(n_requests, server, progress=progress, desc=f"simulate ({logging})", on_step=on_step).table()


def _shard(args):
    model_dir, n, seed, logging, concurrency, arm_weights, counterfactuals, queue = args
    return simulate_log(model_dir, n, seed=seed, logging=logging, concurrency=concurrency, progress=False,
                        arm_weights=arm_weights, counterfactuals=counterfactuals, progress_queue=queue)


def simulate_log_sharded(model_dir, n_requests: int, seed: int = 0, logging: str = "random",
                         concurrency: int = 256, workers: int = 2, arm_weights=None,
                         counterfactuals: bool = True, progress: bool = True):
    """simulate_log split over `workers` processes (independent session streams with seeds
    seed*1000 + shard); request and session ids are made unique with the shard in bits 40+.
    The shards report their progress through a queue to one progress bar."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp
    import queue as queue_mod

    from tqdm import tqdm

    import pyarrow as pa
    import pyarrow.compute as pc

    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    sizes = [n_requests // workers + (1 if s < n_requests % workers else 0) for s in range(workers)]
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        q = manager.Queue()
        jobs = [(str(model_dir), n, seed * 1000 + s, logging, concurrency, arm_weights, counterfactuals, q)
                for s, n in enumerate(sizes) if n > 0]
        with ProcessPoolExecutor(len(jobs), mp_context=ctx) as pool, \
                tqdm(total=n_requests, desc=f"simulate ({logging}, {len(jobs)} processes)", unit="req",
                     disable=not progress, mininterval=1.0) as bar:
            futures = [pool.submit(_shard, job) for job in jobs]
            while not all(f.done() for f in futures):
                try:
                    bar.update(q.get(timeout=0.5))
                except queue_mod.Empty:
                    pass
            tables = [f.result() for f in futures]
    out = []
    for s, t in enumerate(tables):
        for col in ("request_id", "session_id"):
            t = t.set_column(t.column_names.index(col), col, pc.add(t[col], pa.scalar(s << 40, pa.int64())))
        out.append(t)
    return pa.concat_tables(out).sort_by([("ts", "ascending"), ("request_id", "ascending")])
