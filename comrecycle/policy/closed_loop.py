"""Closed-loop evaluation: the policy deployed in the simulator, deciding per request from the
estimator's predictions on the live cache state, with its own recycling changing the caches
it later reads (what a log evaluation cannot show).

Realised loss is measured per request against the full cascade on the same state:
    loss % = Σ_i (q_i0 − q_i,served) / Σ_i q_i0          (q from the simulator, exact)
    compute saved % = 1 − (Σ_i c_served + estimator cost × repeated requests) / (n · c_0)

`LambdaController` is the near-line λ: it watches the predicted loss of recent decisions and
moves λ multiplicatively so that predicted loss / predicted effect stays at the budget when
the traffic shifts (a different repeat share, user mix, cache ages).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..specs import CACHE_STATE_FIELDS, N_RECYCLE
from .decide import decide, depth_guard, policy_dq
from ..errors import UserError


@dataclass
class LambdaController:
    """λ_{t+1} = λ_t · exp(gain · (L_t / (b · Q_t) − 1)), clipped to [lam_min, lam_max], where
    L_t and Q_t are exponentially weighted sums (half-life `half_life` requests) of the
    predicted loss of the chosen strategies and of the predicted effect of full computation
    (initial requests count in Q with their predicted Q_0: they are part of the traffic the
    budget is relative to)."""

    lam: float
    budget: float
    gain: float = 0.5
    half_life: float = 2000.0
    lam_min: float = 1e-3
    lam_max: float = 1e6
    loss_ewma: float = 0.0
    effect_ewma: float = 0.0
    trace: list = field(default_factory=list)

    def update(self, pred_loss: np.ndarray, pred_effect: np.ndarray) -> float:
        n = len(pred_effect)
        if n == 0:
            return self.lam
        decay = 0.5 ** (n / self.half_life)
        self.loss_ewma = decay * self.loss_ewma + float(np.sum(pred_loss))
        self.effect_ewma = decay * self.effect_ewma + float(np.sum(pred_effect))
        ratio = self.loss_ewma / max(self.budget * self.effect_ewma, 1e-12)
        self.lam = float(np.clip(self.lam * np.exp(self.gain * np.clip(ratio - 1.0, -1.0, 1.0)),
                                 self.lam_min, self.lam_max))
        self.trace.append((self.lam, ratio * self.budget))
        return self.lam


class _RecordsDecisions:
    """The predicted loss and effect of every decision batch of a budget-driven policy."""

    def _init_records(self) -> None:
        self.pred_loss: list[float] = []
        self.pred_effect: list[float] = []
        self.pred_n: list[int] = []  # requests per decision batch

    def predicted_loss_pct(self, skip_requests: int = 0) -> float:
        """Predicted loss % over the batches that end after the first `skip_requests` requests
        (a warm-up that is not measured)."""
        measured = np.cumsum(self.pred_n) > skip_requests
        return 100 * float(np.sum(np.asarray(self.pred_loss)[measured]) / np.sum(np.asarray(self.pred_effect)[measured]))


def _controlled_choice(policy, dq: np.ndarray, available: np.ndarray, rep: np.ndarray,
                       effect: np.ndarray, realised=None) -> np.ndarray:
    """The shared decision step of the budget-driven policies: λ from the policy's controller
    (if any), the params' rule on ΔQ [n, K+1], strategy 0 for initial requests, then the
    predicted loss of the choice and the effect `effect` [n] recorded and fed to the controller.
    realised: s [n] -> (loss [n], effect [n]) fed to the controller instead (λ held on the
    true loss of what was chosen)."""
    if policy.controller is not None:
        policy.params["lambda"] = policy.controller.lam
    s = decide(dq, available, policy.params)
    s[~rep] = 0
    chosen = dq[np.arange(len(s)), s]
    policy.pred_loss.append(float(chosen.sum()))
    policy.pred_effect.append(float(np.sum(effect)))
    policy.pred_n.append(len(s))
    if policy.controller is not None:
        policy.controller.update(*(realised(s) if realised is not None else (chosen, effect)))
    return s


def estimator_features(batch, cache_state: np.ndarray) -> dict[str, np.ndarray]:
    """The estimator's served inputs of a simulator batch on its live cache state [B, 3K]."""
    return {"user_features": batch.user_features.astype(np.int64), "history": np.asarray(batch.history, np.int64),
            "request_features": batch.request_features, "cache_state": cache_state.astype(np.float32)}


class PolicyAssignment(_RecordsDecisions):
    """An `assign(batch, available, cache_state)` for RecyclingServer: the estimator's ΔQ̂ on
    the live cache state, then the params' decision rule with λ from a controller, and
    ε-exploration (what the installed router does not do; without them simulate_policy uses the
    router's own decision)."""

    def __init__(self, estimator, params: dict, controller: LambdaController | None = None,
                 explore: float = 0.0, explore_arms: tuple[int, ...] | None = None, seed: int = 0,
                 explore_shadow: bool = False):
        """explore = ε: each repeated request is served, with probability ε, by a uniformly
        random available strategy among explore_arms (default: all) instead of the policy's
        choice, and its logging propensity is recorded. Such a log of the deployed policy's
        own states is what calibrate-estimator needs: the loss at a given cache depth depends
        on the policy that aged the cache (docs/history.md, "Per-depth calibration fitted off-policy").

        explore_shadow: an explored strategy is served, but the cache keeps what the policy's
        choice would have left (`cache_as`): an explored refresh does not rejuvenate the lists
        the policy would have reused, and an explored recycle does not age the lists the policy
        would have refreshed (its refresh runs in the shadow). The log's states stay the
        policy's: what `solve` needs to certify the deployed rule on its own states."""
        self.estimator, self.params, self.controller = estimator, dict(params), controller
        self.explore, self.explore_arms = float(explore), explore_arms
        self.explore_shadow = bool(explore_shadow)
        self.rng = np.random.default_rng([seed, 23])
        self.cache_as: np.ndarray | None = None  # [B] per request of the last batch, with explore_shadow
        self._init_records()

    def __call__(self, batch, available: np.ndarray, cache_state: np.ndarray):
        q, dq = self.estimator.predict(estimator_features(batch, cache_state))
        dq = np.concatenate([np.zeros((len(dq), 1)), dq], 1)
        dq = policy_dq(dq, self.params)
        rep = np.asarray(batch.is_repeat)
        available = depth_guard(available, cache_state, self.params.get("max_pages"))
        s = _controlled_choice(self, dq, available, rep, q[:, 0])
        propensity = np.ones(len(s), np.float32)
        choice = s
        if self.explore > 0:
            s, propensity = explore(s, available, rep, self.explore, self.explore_arms, self.rng)
        self.cache_as = choice.astype(np.int8) if self.explore_shadow else None
        return s.astype(np.int8), propensity


def explore(choice: np.ndarray, available: np.ndarray, repeat: np.ndarray, eps: float,
            arms: tuple[int, ...] | None, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """ε-exploration around a deterministic choice [n]: with probability ε a uniformly random
    strategy among the available `arms` (the choice is always one of them when it is
    available); returns the served strategies and their propensities under this rule."""
    n = len(choice)
    allowed = available.copy()
    if arms is not None:
        mask = np.zeros(available.shape[1], bool)
        mask[list(arms)] = True
        allowed &= mask[None, :]
    allowed[np.arange(n), choice] = True  # the policy's own choice stays possible
    k = allowed.sum(1)
    u = rng.random(allowed.shape) * allowed
    random_arm = u.argmax(1)
    go = repeat & (rng.random(n) < eps)
    served = np.where(go, random_arm, choice)
    p = np.where(repeat, eps / k + (served == choice) * (1 - eps), 1.0)
    return served, p.astype(np.float32)


class OracleAssignment(_RecordsDecisions):
    """The oracle in the closed loop: the true ΔQ of every available strategy (each one run
    on the live state, exact expected clicks), then the same decision rule and controller.
    Costs 4 cascades per repeated request, so it is for evaluation only."""

    def __init__(self, params: dict, controller: LambdaController | None = None):
        self.params, self.controller = dict(params), controller
        self.server = None  # set by simulate_policy (the RecyclingServer that calls us)
        self._init_records()

    def __call__(self, batch, available: np.ndarray, cache_state: np.ndarray):
        B = len(batch)
        q = np.full((B, N_RECYCLE + 1), np.nan)
        for j in range(N_RECYCLE + 1):
            idx = np.flatnonzero(available[:, j] & (batch.is_repeat | (j == 0)))
            if idx.size:
                q[idx, j] = self.server.expected_clicks(batch, idx, j)
        rep = np.asarray(batch.is_repeat)
        dq = np.where(available, q[:, :1] - q, 0.0)
        s = _controlled_choice(self, dq, available, rep, q[:, 0])
        return s.astype(np.int8), np.ones(B, np.float32)


class CeilingAssignment(_RecordsDecisions):
    """A feature ceiling in the closed loop: ΔQ̂ from regressors of the true ΔQ on the live
    request — a policy.frontier.FeatureCeiling on its observable features, or an
    EffectLossEstimator fitted to the true q_j (label "true-q") on the estimator's inputs, both
    fitted on a separate randomised log — the params' decision rule (no loss floor), and a λ
    controller fed the *true* loss and
    effect of what it chose (q_0 and the chosen strategy's page, run on the live state): λ
    tuned on the true loss, as for the oracle. What a policy that sees only those features can
    reach on its own cache states. Costs up to 2 extra cascades per request: evaluation only."""

    def __init__(self, params: dict, ceiling, controller: LambdaController | None = None):
        from ..estimator.effect_loss import EffectLossEstimator

        self.params, self.ceiling, self.controller = dict(params), ceiling, controller
        # which inputs the ceiling reads, decided once (not per batch)
        self.on_estimator_inputs = isinstance(ceiling, EffectLossEstimator)
        self.server = None  # set by simulate_policy (the RecyclingServer that calls us)
        self._init_records()

    def __call__(self, batch, available: np.ndarray, cache_state: np.ndarray):
        from .guards import observable_features_of_batch

        B = len(batch)
        q0 = self.server.expected_clicks(batch, np.arange(B), 0)

        def true_loss(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            loss = np.zeros(B)
            for j in range(1, N_RECYCLE + 1):
                idx = np.flatnonzero(s == j)
                if idx.size:
                    loss[idx] = q0[idx] - self.server.expected_clicks(batch, idx, j)
            return loss, q0

        available = depth_guard(available, cache_state, self.params.get("max_pages"))
        if self.on_estimator_inputs:  # an estimator fitted to the true q_j
            dq = self.ceiling.predict(estimator_features(batch, cache_state))[1]
            dq = np.concatenate([np.zeros((B, 1)), dq], 1)
        else:
            dq = self.ceiling.predict(observable_features_of_batch(batch, cache_state))
        s = _controlled_choice(self, dq, available, np.asarray(batch.is_repeat), q0, realised=true_loss)
        return s.astype(np.int8), np.ones(B, np.float32)


def relative_loss_ci(q_ref: np.ndarray, q_served: np.ndarray, session_id: np.ndarray, n_boot: int = 200,
                     seed: int = 7) -> tuple[float, float, float]:
    """Effect loss % = 100 (1 - Σ q_served / Σ q_ref) over the same requests [n], and its 95%
    interval from a session bootstrap (Poisson weights per session: the requests of a session
    are correlated)."""
    _, inv = np.unique(session_id, return_inverse=True)
    ref, srv = np.bincount(inv, q_ref), np.bincount(inv, q_served)
    w = np.random.default_rng(seed).poisson(1.0, (n_boot, ref.size))
    boots = 100 * (1 - (w @ srv) / (w @ ref))
    return float(100 * (1 - srv.sum() / ref.sum())), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def closed_loop_metrics(table, costs, estimator_cost: float = 0.0) -> dict:
    """Realised loss and compute saved of a closed-loop log (q_0 and the served q_j present)."""
    n = table.num_rows
    s = table["strategy"].to_numpy().astype(np.int64)
    rep = table["is_repeat"].to_numpy()
    q = np.stack([table[f"q_{j}"].to_numpy().astype(np.float64) for j in range(N_RECYCLE + 1)], 1)
    served = q[np.arange(n), s]
    if not np.isfinite(served).all() or not np.isfinite(q[:, 0]).all():
        raise UserError("closed-loop log lacks q_0 or the served strategy's q")
    costs = np.asarray(costs, np.float64)
    loss, lo, hi = relative_loss_ci(q[:, 0], served, table["session_id"].to_numpy())
    spent = costs[s].sum() + estimator_cost * rep.sum()
    return {"requests": n, "repeated": int(rep.sum()),
            "effect_loss_pct": loss, "loss_ci95": [lo, hi],
            "compute_saved_pct": 100 * (1 - spent / (costs[0] * n)),
            "compute_saved_without_estimator_pct": 100 * (1 - costs[s].sum() / (costs[0] * n)),
            "strategy_mix": {str(j): float(np.mean(s[rep] == j)) for j in range(N_RECYCLE + 1)},
            "strategy_mix_over": "repeated requests",
            "expected_clicks_per_request": float(np.mean(served))}


class DcafAssignment(_RecordsDecisions):
    """A DCAF-style baseline in the closed loop: the same decision rule and λ controller, but
    ΔQ comes from a hand-picked feature instead of a learned uplift model, as in the log
    frontier (policy/frontier.py): ΔQ_ij = mean_loss_j · (0.05 + pages_i / mean_pages), where
    pages_i is how many pages the live cached lists have served (the most of them),
    mean_loss_j the IPW mean loss of strategy j in an exploration log, and mean_pages the
    feature's mean on that log's repeated requests. Strategies the log never served (no
    estimate) are not used. The controller's effect Q_0 is the log's mean reward per request."""

    def __init__(self, params: dict, mean_loss: np.ndarray, mean_pages: float, mean_effect: float,
                 controller: LambdaController | None = None):
        mean_loss = np.asarray(mean_loss, np.float64)
        if mean_loss.shape != (N_RECYCLE + 1,) or not np.isfinite(mean_loss[0]):
            raise UserError(f"mean_loss: expected {N_RECYCLE + 1} values (strategy 0 first), got {mean_loss!r}")
        if not (mean_pages > 0 and mean_effect > 0):
            raise UserError(f"mean_pages and mean_effect must be > 0, got {mean_pages}, {mean_effect}")
        self.params, self.controller = dict(params), controller
        self.mean_loss, self.mean_pages, self.mean_effect = mean_loss, float(mean_pages), float(mean_effect)
        self.usable = np.isfinite(mean_loss)
        self._loss = np.where(self.usable, mean_loss, 0.0)  # strategies without an estimate are masked
        self._init_records()

    def proxy(self, cache_state: np.ndarray) -> np.ndarray:
        """[n, K+1] the hand-picked ΔQ (column 0 = 0) from cache_state [n, K * 3]."""
        cs = np.asarray(cache_state, np.float64).reshape(len(cache_state), N_RECYCLE, len(CACHE_STATE_FIELDS))
        pages = np.maximum(cs[:, :, CACHE_STATE_FIELDS.index("pages")].max(axis=1), 0.0)
        dq = self._loss[None, :] * (0.05 + pages / self.mean_pages)[:, None]
        dq[:, 0] = 0.0
        return dq

    def __call__(self, batch, available: np.ndarray, cache_state: np.ndarray):
        rep = np.asarray(batch.is_repeat)
        dq = self.proxy(cache_state)
        available = depth_guard(available, cache_state, self.params.get("max_pages")) & self.usable[None, :]
        available[:, 0] = True
        s = _controlled_choice(self, dq, available, rep, np.full(len(rep), self.mean_effect))
        return s.astype(np.int8), np.ones(len(s), np.float32)


def dcaf_from_logs(table, min_rows: int = 50) -> dict:
    """DcafAssignment's inputs from an exploration log (propensities logged): mean_loss [K+1]
    (NaN for strategies with fewer than `min_rows` repeated requests served by them),
    mean_pages and mean_effect."""
    from .frontier import feature_values, ipw_mean_loss

    rep = table["is_repeat"].to_numpy()
    served = table["strategy"].to_numpy()[rep]
    mean_loss = ipw_mean_loss(table)
    counts = np.bincount(served.astype(np.int64), minlength=N_RECYCLE + 1)
    mean_loss = np.where(counts >= min_rows, mean_loss, np.nan)
    if counts[0] < min_rows:
        raise UserError(f"the log has {counts[0]} repeated requests served by strategy 0; the IPW mean "
                         f"loss needs at least {min_rows} (an exploration log with --explore-arms including 0)")
    pages = feature_values(table, "cache_pages")[rep]
    return {"mean_loss": mean_loss, "mean_pages": float(max(pages.mean(), 1e-9)),
            "mean_effect": float(max(table["reward"].to_numpy().mean(), 1e-9)),
            "rows": {str(j): int(c) for j, c in enumerate(counts)}}


def simulate_policy(model_dir, n_requests: int, seed: int = 0, estimator_dir=None, params: dict | None = None,
                    controller: LambdaController | None = None, strategy: int | None = None,
                    concurrency: int = 256, progress: bool = True, sim_options: dict | None = None,
                    oracle: bool = False, max_pages: int | None = None, random_p: float | None = None,
                    explore: float = 0.0, explore_arms: tuple[int, ...] | None = None, dcaf: dict | None = None,
                    explore_shadow: bool = False, ceiling=None):
    """Run a policy (or a fixed `strategy` for every repeated request) in the simulator, every
    page served by recycle_router's core (sim.recycling.RecyclingServer).
    Returns (log table with q_0 and the served q_j, in serving order; the policy object or None).

    With an estimator and params and neither a controller nor exploration, the router decides as
    installed (router.decision.LearnedDecision on the estimator's ONNX graph). Otherwise a
    simulator policy replaces its decision step: PolicyAssignment (controller, exploration),
    the oracle, DCAF, a fixed strategy or random recycling.
    max_pages: the depth guard for a fixed strategy (a policy takes it from its params).
    sim_options: SessionSimulator keyword overrides (e.g. continue_prob) for shifted traffic.
    random_p: the random-recycling baseline (recycle with probability p, random strategy).
    dcaf: dcaf_from_logs(...) for the DCAF-style baseline (with params and the controller).
    ceiling: a policy.frontier.FeatureCeiling, or an EffectLossEstimator with label "true-q", for
    a feature ceiling (with params and the controller; CeilingAssignment)."""
    from ..router.params import RouterParams
    from ..sim.env import SessionSimulator
    from ..sim.recycling import RecyclingServer, fixed_assignment, load_model_set, random_assignment

    world, cascade, costs = load_model_set(model_dir)
    router_params, router_estimator = None, None
    if random_p is not None:
        rand = random_assignment(random_p, seed)
        policy = None

        def assign(batch, available, cache_state):
            return rand(batch, depth_guard(available, cache_state, max_pages), cache_state)
    elif strategy is not None:
        fixed = fixed_assignment(strategy)
        policy = None

        def assign(batch, available, cache_state):
            return fixed(batch, depth_guard(available, cache_state, max_pages), cache_state)
    elif oracle:
        policy = assign = OracleAssignment(params, controller)
    elif ceiling is not None:
        policy = assign = CeilingAssignment(params, ceiling, controller)
    elif dcaf is not None:
        policy = assign = DcafAssignment(params, dcaf["mean_loss"], dcaf["mean_pages"], dcaf["mean_effect"], controller)
    elif controller is None and explore == 0:
        policy = assign = None  # the router's own decision
        router_params, router_estimator = RouterParams.from_dict(params, "params"), estimator_dir
    else:
        from ..estimator.effect_loss import EffectLossEstimator

        policy = assign = PolicyAssignment(EffectLossEstimator.load(estimator_dir), params, controller,
                                           explore=explore, explore_arms=explore_arms, seed=seed,
                                           explore_shadow=explore_shadow)
    server = RecyclingServer(world, cascade, assign, costs, counterfactuals=(0,), params=router_params,
                             estimator_dir=router_estimator)
    if oracle or ceiling is not None:
        policy.server = server
    sim = SessionSimulator(world, seed=seed, concurrency=min(concurrency, world.n_users // 2), **(sim_options or {}))
    name = (f"random p={random_p:g}" if random_p is not None else "full" if strategy == 0
            else f"strategy {strategy}" if strategy is not None else "oracle" if oracle
            else "feature ceiling" if ceiling is not None else "dcaf" if dcaf is not None else "policy")
    return sim.run(n_requests, server, progress=progress, desc=f"closed loop ({name})").table(), policy
