"""Recycling inside the simulator: `RecyclingServer`, a simulator `serve` function that is
recycle_router's own core (router.core.RecycleRouter, with a memory cache and the in-process
stages, the client in the loop), and the simulator's policies that replace its decision step
(logging, static, random; the oracle and the baselines in policy.closed_loop).

Cache semantics are the router's (router.state, router.request_filter):
  * after a request, each stage output that was computed is written back;
  * the items the user viewed (exposed) are removed from every cached list of that user;
  * strategy j > 0 reads the cached output of STAGES[j-1] and runs STAGES[j:] on it;
  * a first page (new session) starts from an empty cache and always uses strategy 0;
  * a list older than the TTL is treated as absent (the request filter's "expired").
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError
from ..router.batch import STRATEGY_OUTPUTS, RouterRequest, call_strategy
from ..router.core import RecycleRouter
from ..router.decision import LearnedDecision
from ..router.inprocess import InProcessBackend
from ..router.memory_cache import MemoryStageCache
from ..router.params import RouterParams
from ..router.request_filter import parse_request
from ..runtime.cascade import InProcessCascade
from ..runtime.estimator_onnx import EstimatorRuntime
from ..specs import N_RECYCLE, STRATEGIES, UNAVAILABLE_SCORE
from .env import Outcome, RequestBatch
from .router_loop import RouterInTheLoop, router_sender
from .world import World

N_STRATEGIES = len(STRATEGIES)


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
    """A simulator `serve` function: recycle_router's core with the client in the loop.

    assign: a simulator policy that replaces the router's decision step, called once per batch
    with every request of it (`AssignFn`; initial requests may only get strategy 0); None: the
    router's own decision (the estimator in `estimator_dir` and `params`, as installed).
    counterfactuals=True also runs every available strategy for every repeated request, on the
    same state, and records q_j = the exact expected clicks of strategy j's page (NaN where
    unavailable); False: the served strategy's only; a tuple: those strategies' besides the served
    one. Only the served page is written back to the cache. `last` holds what the log records of
    the last batch (strategy, propensity, q, cache_state, cost).
    """

    def __init__(self, world: World, cascade: InProcessCascade, assign: AssignFn | None,
                 strategy_cost: dict[int, float] | None = None, counterfactuals: bool | tuple[int, ...] = False,
                 params: RouterParams | None = None, estimator_dir=None):
        self.world, self.assign = world, assign
        self.cost = strategy_cost or {j: 1.0 if j == 0 else float("nan") for j in STRATEGIES}
        if counterfactuals is True:
            counterfactuals = tuple(STRATEGIES)
        self.counterfactuals = tuple(counterfactuals or ())
        if params is None:
            if assign is None:
                raise UserError("the router's own decision needs its params (and estimator)")
            params = RouterParams(lam=0.0, costs=tuple(float(np.nan_to_num(self.cost[j], nan=1.0)) for j in STRATEGIES))
        estimator = None if estimator_dir is None else EstimatorRuntime(Path(estimator_dir) / "estimator.onnx")
        self.backend = InProcessBackend(cascade.stages, estimator)
        # the router's own decision step (assign None) or the simulator policy, then the q_j tap
        self.learned = LearnedDecision(params) if assign is None else None
        self.router = RecycleRouter(MemoryStageCache(), self.backend, params, "simulator", decision=self._decide)
        self.client = RouterInTheLoop(router_sender(self.router), record=False)
        self.last: dict[str, np.ndarray] = {}
        self._batch: RequestBatch | None = None
        self._live: dict[int, RouterRequest] = {}  # batch row -> the router's request, while deciding
        self._failure: BaseException | None = None

    def __call__(self, batch: RequestBatch) -> list[np.ndarray]:
        B = len(batch)
        self._batch, self._failure = batch, None
        self._q = np.full((B, N_STRATEGIES), np.nan, np.float32)
        self._state = np.full((B, 3 * N_RECYCLE), -1, np.float32)
        self._propensity = np.ones(B, np.float32)
        self._computed: dict[tuple[int, int], dict] = {}  # (batch row, strategy) -> outputs the tap ran
        try:
            pages = self.client(batch)
        finally:
            self._batch, self._live, self._computed = None, {}, {}
        if self._failure is not None:
            raise self._failure
        if self.client.errors:
            raise RuntimeError(f"the router failed {len(self.client.errors)} request(s): {self.client.errors[:3]}")
        strategy = np.array(self.client.batch_strategies, np.int64)
        todo = np.flatnonzero(np.isnan(self._q[np.arange(B), strategy]))  # served without the tap (new sessions)
        if todo.size:
            self._q[todo, strategy[todo]] = page_expected_clicks(self.world, batch.interest[todo],
                                                                 [pages[i] for i in todo])
        self.last = {"strategy": strategy.astype(np.int8), "propensity": self._propensity, "q": self._q,
                     "cache_state": self._state,
                     "cost": np.array([self.cost[int(s)] for s in strategy], np.float32)}
        return pages

    def on_feedback(self, batch: RequestBatch, outcome: Outcome) -> None:
        """The viewed and clicked items go with the session's next request, as a client sends them."""
        self.client.on_feedback(batch, outcome)

    # ---- the decision step, played by `assign` ------------------------------------------------
    def expected_clicks(self, batch: RequestBatch, idx: np.ndarray, j: int) -> np.ndarray:
        """[len(idx)] exact expected clicks of strategy j's page for rows idx of the batch being
        decided, on the router's state of each request (for policies that look at the truth)."""
        outs = self._run([self._request_of(batch, int(i)) for i in idx], j)
        return page_expected_clicks(self.world, batch.interest[idx], [o["rerank_items"] for o in outs])

    def _request_of(self, batch: RequestBatch, i: int) -> RouterRequest:
        """Row i's request as the router holds it: being decided, or a new session (which the
        router sends to the full cascade at once, with no cache state), parsed from what the
        client sent."""
        r = self._live.get(i)
        if r is None:
            r = parse_request({k: v[None] for k, v in self.client.request(batch, i).items()}, float(batch.ts[i]))[0]
        return r

    def _run(self, reqs: list[RouterRequest], j: int) -> list[dict]:
        """Strategy j's outputs for `reqs`, synchronously: the in-process backend's calls never
        suspend, so the coroutine finishes in one step (also inside the router's event loop)."""
        coro = call_strategy(self.backend, reqs, j)
        try:
            coro.send(None)
        except StopIteration as finished:
            return finished.value
        coro.close()
        raise RuntimeError("the in-process backend suspended a call")

    async def _decide(self, reqs: list[RouterRequest], backend, report) -> None:
        try:
            batch = self._batch
            B = len(batch)
            self._live = {r.index: r for r in reqs}
            avail = np.zeros((B, N_STRATEGIES), bool)
            avail[:, 0] = True
            for r in reqs:
                avail[r.index], self._state[r.index] = r.available, r.cache_state
            avail[~np.asarray(batch.is_repeat, bool), 1:] = False
            if self.learned is not None:
                await self.learned(reqs, backend, report)
                strategy = np.zeros(B, np.int64)
                for r in reqs:
                    strategy[r.index] = r.strategy
                self._tap(avail, strategy)
            else:
                self._assigned(avail)
        except BaseException as e:  # noqa: BLE001 - raised by __call__, not turned into strategy 0
            self._failure = e
            raise

    def _assigned(self, avail: np.ndarray) -> None:
        """The simulator policy's strategies for the live requests."""
        batch = self._batch
        B = len(batch)
        strategy, propensity = self.assign(batch, avail, self._state)
        strategy = np.asarray(strategy, np.int64)
        if not avail[np.arange(B), strategy].all():
            raise ValueError("assignment chose a strategy whose cache is unavailable")
        if set(np.flatnonzero(strategy != 0).tolist()) - set(self._live):
            raise ValueError("assignment recycled a request that starts a session")
        self._propensity = np.asarray(propensity, np.float32)
        self._tap(avail, strategy)
        cache_as = getattr(self.assign, "cache_as", None)
        for i in sorted(self._live):
            r, s = self._live[i], int(strategy[i])
            r.strategy = s
            r.scores = np.where(avail[i], -np.nan_to_num([self.cost[k] for k in STRATEGIES], nan=0.0),
                                UNAVAILABLE_SCORE).astype(np.float32)
            # an assignment may ask that the cache keep what another strategy would have left
            # (shadow exploration: an explored strategy is served, the policy's choice written back)
            if cache_as is not None and int(cache_as[i]) != s:
                r.cache_outputs = self._shadow_outputs(r, int(cache_as[i]))

    def _shadow_outputs(self, r: RouterRequest, policy_choice: int) -> dict[str, np.ndarray]:
        """The stage outputs that `policy_choice` would have written back for request r, served
        by another strategy: for an explored refresh, the served outputs of the stages the policy's
        choice runs too (the other lists keep aging); for an explored recycle, the outputs of the
        policy's own (fresher) choice, which the tap has usually computed already (q_0)."""
        if policy_choice < r.strategy:
            out = self._computed.get((r.index, policy_choice))
            return out if out is not None else self._run([r], policy_choice)[0]
        return {k: v for k, v in r.outputs.items() if k in STRATEGY_OUTPUTS[policy_choice]}

    def _tap(self, avail: np.ndarray, strategy: np.ndarray) -> None:
        """q_j of the chosen strategy and of the counterfactual ones, each run once on the
        request's state; the chosen outputs are served as computed."""
        batch = self._batch
        rows = np.array(sorted(self._live), np.int64)
        for j in STRATEGIES:
            mine = strategy[rows] == j
            if j in self.counterfactuals:
                mine |= avail[rows, j] & (np.asarray(batch.is_repeat)[rows] | (j == 0))
            idx = rows[mine]
            if idx.size == 0:
                continue
            outs = self._run([self._live[int(i)] for i in idx], j)
            self._q[idx, j] = page_expected_clicks(self.world, batch.interest[idx], [o["rerank_items"] for o in outs])
            for i, o in zip(idx, outs):
                self._computed[(int(i), j)] = o
                if strategy[i] == j:
                    self._live[int(i)].outputs = o  # served as computed: the router does not run it again


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
