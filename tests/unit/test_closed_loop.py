"""The near-line λ controller on a synthetic stream, and the closed-loop policy in the tiny
simulator (real ONNX cascade + estimator, in-process)."""
import numpy as np

from comrecycle.policy.closed_loop import LambdaController, closed_loop_metrics, simulate_policy


def _stream(ctl, scale, steps, rng, batch=256):
    """Requests whose cheapest strategy loses `scale`·u_i; the decision rule recycles request
    i when its gain (1) beats λ·loss_i, so the predicted loss falls as λ grows."""
    ratios = []
    for _ in range(steps):
        loss_i = scale * rng.exponential(0.05, batch)
        effect = rng.uniform(1.0, 3.0, batch)
        chosen = np.where(0.95 > ctl.lam * loss_i, loss_i, 0.0)
        ratios.append(chosen.sum() / effect.sum())
        ctl.update(chosen, effect)
    return np.array(ratios)


def test_controller_holds_the_budget_and_recovers_after_a_shift():
    rng = np.random.default_rng(0)
    ctl = LambdaController(lam=1.0, budget=0.01, gain=0.3, half_life=1000)
    before = _stream(ctl, 1.0, 300, rng)
    lam_before = ctl.lam
    after = _stream(ctl, 3.0, 300, rng)  # traffic shift: every recycling now loses 3x more
    assert abs(before[-100:].mean() - 0.01) < 0.002
    assert abs(after[-100:].mean() - 0.01) < 0.002
    assert abs(np.log(ctl.lam / lam_before)) > 0.2  # it had to move
    # a fixed λ (the pre-shift one) misses the budget after the shift (here: spends too little
    # of it, i.e. wastes compute)
    fixed = LambdaController(lam=lam_before, budget=0.01, gain=0.0)
    assert abs(_stream(fixed, 3.0, 100, rng).mean() / 0.01 - 1) > 0.3


def test_policy_in_the_closed_loop(tiny_model_set, tiny_estimator):
    import json

    costs = [float(v) for v in json.loads((tiny_model_set / "cost_profile.json").read_text())["strategy_cost"].values()]
    params = {"lambda": 5.0, "omega": 0.0, "choice": "argmax", "costs": costs, "budget": 0.01}
    t, pol = simulate_policy(tiny_model_set, 600, seed=3, estimator_dir=tiny_estimator, params=params, progress=False)
    rep = t["is_repeat"].to_numpy()
    s = t["strategy"].to_numpy()
    assert (s[~rep] == 0).all() and (s[rep] > 0).any() and pol is None  # the router decided
    m = closed_loop_metrics(t, costs, estimator_cost=0.01)
    assert abs(sum(m["strategy_mix"].values()) - 1) < 1e-9
    assert m["loss_ci95"][0] <= m["effect_loss_pct"] <= m["loss_ci95"][1]
    assert m["compute_saved_pct"] < m["compute_saved_without_estimator_pct"]
    # always-full on the same seed: nothing saved, nothing lost
    full, _ = simulate_policy(tiny_model_set, 600, seed=3, strategy=0, progress=False)
    mf = closed_loop_metrics(full, costs)
    assert mf["compute_saved_pct"] == 0.0 and abs(mf["effect_loss_pct"]) < 1e-9


def test_the_oracle_in_the_closed_loop_decides_on_the_true_loss(tiny_model_set):
    import json

    costs = [float(v) for v in json.loads((tiny_model_set / "cost_profile.json").read_text())["strategy_cost"].values()]
    params = {"lambda": 5.0, "omega": 0.0, "choice": "argmax", "costs": costs, "budget": 0.01}
    # new sessions (sent to the full cascade, never decided) are in every batch: their q_0 counts in the effect
    t, pol = simulate_policy(tiny_model_set, 400, seed=3, params=params, oracle=True, progress=False)
    rep, s = t["is_repeat"].to_numpy(), t["strategy"].to_numpy()
    assert (~rep).any() and (s[~rep] == 0).all() and (s[rep] > 0).any()
    q0 = t["q_0"].to_numpy()
    assert np.isfinite(q0).all()
    # the predicted loss the oracle reports is the true loss of what it served
    served = np.array([t[f"q_{j}"][i].as_py() for i, j in enumerate(s)], float)
    assert abs(sum(pol.pred_loss) - float(np.sum(q0 - served))) < 1e-3 * max(1.0, float(np.sum(q0)))
    assert abs(sum(pol.pred_effect) - float(np.sum(q0))) < 1e-3 * float(np.sum(q0))


def test_a_true_q_estimator_as_the_ceiling_feeds_the_controller_the_true_loss(tiny_model_set, tiny_random_log):
    """An estimator fitted to the true q_j is run as a feature ceiling: its ΔQ̂ ranks, and the
    λ controller is fed the true loss of what was served (not the estimator's prediction)."""
    import json

    from comrecycle.estimator.effect_loss import EffectLossEstimator

    est = EffectLossEstimator(max_epochs=1, label="true-q", progress=False).fit(tiny_random_log)
    costs = [float(v) for v in json.loads((tiny_model_set / "cost_profile.json").read_text())["strategy_cost"].values()]
    params = {"lambda": 2.0, "omega": 0.0, "choice": "argmax", "costs": costs, "budget": 0.01}
    ctl = LambdaController(lam=2.0, budget=0.01, half_life=1e12)  # no decay: the sums of what it was fed
    t, pol = simulate_policy(tiny_model_set, 400, seed=3, params=params, ceiling=est, controller=ctl,
                             progress=False)
    s = t["strategy"].to_numpy()
    assert (s > 0).any()
    q0 = t["q_0"].to_numpy()
    served = np.array([t[f"q_{j}"][i].as_py() for i, j in enumerate(s)], float)
    true_loss = float(np.sum(q0 - served))
    assert abs(ctl.loss_ewma - true_loss) < 1e-3 * float(np.sum(q0))
    assert abs(sum(pol.pred_loss) - true_loss) > 1e-3 * float(np.sum(q0))  # its prediction is not the truth


def test_the_installed_rule_and_the_simulators_learned_policy_decide_alike(tiny_model_set, tiny_estimator):
    """The closed loop of the installed rule (the router's own decision step: the estimator's ONNX
    graph called on the live cache state, the params' rule) and the simulator's PolicyAssignment
    (the torch estimator, used with a λ controller or exploration) in its place: the same
    strategies, pages (q of the served page) and reference q_0 on every request."""
    import json

    from comrecycle.estimator.effect_loss import EffectLossEstimator
    from comrecycle.policy.closed_loop import PolicyAssignment
    from comrecycle.sim.env import SessionSimulator
    from comrecycle.sim.recycling import RecyclingServer, load_model_set

    costs = [float(v) for v in json.loads((tiny_model_set / "cost_profile.json").read_text())["strategy_cost"].values()]
    params = {"lambda": 5.0, "omega": 0.0, "choice": "argmax", "costs": costs, "budget": 0.01}
    core, policy = simulate_policy(tiny_model_set, 600, seed=3, estimator_dir=tiny_estimator, params=params,
                                   progress=False)
    assert policy is None  # the router decided
    world, cascade, model_costs = load_model_set(tiny_model_set)
    server = RecyclingServer(world, cascade, PolicyAssignment(EffectLossEstimator.load(tiny_estimator), params),
                             model_costs, counterfactuals=(0,))
    sim = SessionSimulator(world, seed=3, concurrency=min(256, world.n_users // 2)).run(600, server, progress=False).table()
    s = core["strategy"].to_numpy()
    np.testing.assert_array_equal(s, sim["strategy"].to_numpy())
    assert 0.05 < (s[core["is_repeat"].to_numpy()] > 0).mean() < 0.95  # the estimator decides both ways
    served = np.arange(len(s))
    for t in (sim, core):
        assert np.isfinite(np.stack([t[f"q_{j}"].to_numpy() for j in range(4)], 1)[served, s]).all()
    np.testing.assert_allclose(core["q_0"].to_numpy(), sim["q_0"].to_numpy(), rtol=1e-5)
    np.testing.assert_allclose(core["expected_reward"].to_numpy(), sim["expected_reward"].to_numpy(), rtol=1e-5)


def test_the_simulators_learned_policy_keeps_the_certified_family(tiny_model_set, tiny_estimator):
    """Params certified for a family of strategies ("strategies": here 0-2, not 3): the router and
    the simulator's PolicyAssignment both keep to it."""
    import json

    from comrecycle.estimator.effect_loss import EffectLossEstimator
    from comrecycle.policy.closed_loop import PolicyAssignment
    from comrecycle.sim.env import SessionSimulator
    from comrecycle.sim.recycling import RecyclingServer, load_model_set

    costs = [float(v) for v in json.loads((tiny_model_set / "cost_profile.json").read_text())["strategy_cost"].values()]
    params = {"lambda": 0.01, "omega": 0.0, "choice": "argmax", "costs": costs, "budget": 0.01, "strategies": [0, 1, 2]}
    core, _ = simulate_policy(tiny_model_set, 300, seed=3, estimator_dir=tiny_estimator, params=params, progress=False)
    world, cascade, model_costs = load_model_set(tiny_model_set)
    server = RecyclingServer(world, cascade, PolicyAssignment(EffectLossEstimator.load(tiny_estimator), params),
                             model_costs, counterfactuals=(0,))
    sim = SessionSimulator(world, seed=3, concurrency=min(256, world.n_users // 2)).run(300, server, progress=False).table()
    for t in (core, sim):
        s = t["strategy"].to_numpy()
        assert not (s == 3).any() and (s == 2).any()


def test_random_recycling_baseline_recycles_about_p_of_the_usable_repeats(tiny_model_set):
    import json

    costs = [float(v) for v in json.loads((tiny_model_set / "cost_profile.json").read_text())["strategy_cost"].values()]
    mixes = {}
    for p in (0.0, 0.5, 1.0):
        t, pol = simulate_policy(tiny_model_set, 500, seed=4, random_p=p, progress=False)
        assert pol is None
        s, rep = t["strategy"].to_numpy(), t["is_repeat"].to_numpy()
        assert (s[~rep] == 0).all()
        mixes[p] = float(np.mean(s[rep] > 0))
        if p == 0.0:
            assert closed_loop_metrics(t, costs)["compute_saved_pct"] == 0.0
    assert mixes[0.0] == 0.0 and 0.3 < mixes[0.5] / mixes[1.0] < 0.7 and mixes[1.0] > 0.5


def test_frontier_summary_compares_families_at_equal_realised_loss():
    from comrecycle.policy.closed_loop_frontier import Job, markdown, plan, summarise

    rows = []
    for seed, shift in ((5, 0.0), (7, 0.2)):
        for m, saved, loss in ((3, 48.0, -0.9), (4, 54.0, -0.2), (5, 57.0, 0.9), (None, 60.0, 5.0)):
            rows.append({"family": "static-3", "knob": m, "seed": seed, "saved_pct": saved, "loss_pct": loss + shift,
                         "loss_lo": loss - 1, "loss_hi": loss + 1, "predicted_loss_pct": None, "lambda_end": None})
        for b, saved, loss in ((1.0, 58.0, 4.8), (5.0, 60.0, 6.0)):
            rows.append({"family": "comrecycle", "knob": b, "seed": seed, "saved_pct": saved, "loss_pct": loss,
                         "loss_lo": loss - 1, "loss_hi": loss + 1, "predicted_loss_pct": b, "lambda_end": 0.3})
    s = summarise(rows, budgets_pct=(0.5, 1.0, 5.0))
    at = {r["budget_pct"]: r for r in s["at_budget"]}
    # static: at b = 0.5% only M <= 4 qualifies (mean loss -0.1%); at 1%, M = 5 (mean loss 1.0%)
    assert at[0.5]["static-3"]["knob"] == 4 and at[1.0]["static-3"]["knob"] == 5
    assert at[5.0]["static-3"]["knob"] == 5  # guard off: mean loss 5.1% > 5%
    assert at[1.0]["comrecycle"]["within_budget"] is False and at[5.0]["comrecycle"]["within_budget"] is False
    md = markdown(s, rows)
    assert "| static-3 | M = 4 | 54.0 | -0.10 |" in md and "✗" in md
    jobs = plan([5], with_estimator=False)
    assert {j.family for j in jobs} == {"static-3", "random"} and len({j.name for j in jobs}) == len(jobs)
    args = Job("comrecycle", 1.0, 5).args("m", "est", "p.json", 100)
    assert args[-7:] == ["--estimator", "est", "--params", "p.json", "--controller", "--budget", "0.01"]


def test_exploration_propensities_are_the_probabilities_of_the_served_arms():
    from comrecycle.policy.closed_loop import explore

    rng = np.random.default_rng(0)
    n = 40000
    avail = np.ones((n, 4), bool)
    avail[: n // 2, 1:3] = False  # half the rows: only 0 and 3 available
    choice = np.full(n, 3)
    rep = np.ones(n, bool)
    rep[-100:] = False
    s, p = explore(choice, avail, rep, 0.3, None, rng)
    assert (p[~rep] == 1).all()
    # rows with {0, 3}: P(0) = 0.15, P(3) = 0.85; rows with all four: P(0) = 0.075, P(3) = 0.775
    a, b = slice(0, n // 2), slice(n // 2, n - 100)
    assert abs(np.mean(s[a] == 0) - 0.15) < 0.01 and np.allclose(p[a][s[a] == 0], 0.15)
    assert np.allclose(p[a][s[a] == 3], 0.85) and abs(np.mean(s[b] == 0) - 0.075) < 0.01
    assert np.allclose(p[b][s[b] == 3], 0.775) and np.allclose(p[b][s[b] == 1], 0.075)
    # restricted to arms 0 and 3: never 1 or 2, even where available
    s2, p2 = explore(choice, avail, rep, 0.3, (0, 3), rng)
    assert not np.isin(s2, [1, 2]).any() and np.allclose(p2[s2 == 0], 0.15)
    # an unbiased IPW mean of an arm-dependent reward
    reward = np.array([2.0, 1.9, 1.8, 1.5])[s]
    ipw0 = np.mean((s == 0) * reward / p)
    assert abs(ipw0 - 2.0) < 0.1


def _exploration_log(n=4000, seed=0, loss3=0.3):
    """A synthetic exploration log: repeated requests served 0 or 3 at random (propensity 0.5),
    strategy 3 losing `loss3` clicks on average; pages served from the cache in 0..4."""
    import pyarrow as pa

    from comrecycle.specs import CACHE_STATE_FIELDS

    rng = np.random.default_rng(seed)
    rep = rng.random(n) < 0.75
    s = np.where(rep, rng.choice([0, 3], n), 0)
    reward = rng.poisson(2.0, n) - np.where(s == 3, rng.binomial(1, loss3, n), 0)
    cs = np.full((n, 3, len(CACHE_STATE_FIELDS)), -1.0, np.float32)
    cs[rep, :, 1] = rng.integers(0, 5, (rep.sum(), 1))
    return pa.table({"is_repeat": rep, "strategy": s.astype(np.int8), "reward": reward.astype(np.float32),
                     "propensity": np.where(rep, 0.5, 1.0).astype(np.float32),
                     "cache_state": pa.FixedSizeListArray.from_arrays(pa.array(cs.reshape(-1)), 3 * len(CACHE_STATE_FIELDS))})


def test_dcaf_inputs_from_an_exploration_log():
    import pytest

    from comrecycle.policy.closed_loop import dcaf_from_logs

    d = dcaf_from_logs(_exploration_log(loss3=0.3))
    assert d["mean_loss"][0] == 0.0 and abs(d["mean_loss"][3] - 0.3) < 0.12
    assert np.isnan(d["mean_loss"][1]) and np.isnan(d["mean_loss"][2])  # never served: no estimate
    assert 1.5 < d["mean_pages"] < 2.5 and 1.5 < d["mean_effect"] < 2.2
    log = _exploration_log()
    only3 = log.filter(np.asarray(log["strategy"]) != 0)
    with pytest.raises(ValueError, match="served by strategy 0"):
        dcaf_from_logs(only3)


def test_dcaf_assignment_uses_the_hand_picked_feature_and_the_controller():
    from types import SimpleNamespace

    from comrecycle.policy.closed_loop import DcafAssignment, LambdaController
    from comrecycle.specs import CACHE_STATE_FIELDS

    mean_loss = np.array([0.0, np.nan, np.nan, 0.2])
    params = {"lambda": 1.0, "omega": 0.0, "choice": "argmax", "costs": [1.0, 0.9, 0.8, 0.05], "budget": 0.01}
    ctl = LambdaController(lam=1.0, budget=0.01)
    pol = DcafAssignment(params, mean_loss, mean_pages=2.0, mean_effect=2.0, controller=ctl)
    pages = np.array([0, 1, 2, 4, 8, 16, 0])
    n = len(pages)
    cs = np.full((n, 3, len(CACHE_STATE_FIELDS)), -1.0, np.float32)
    cs[:, :, 1] = pages[:, None]
    dq = pol.proxy(cs.reshape(n, -1))
    np.testing.assert_allclose(dq[:, 3], 0.2 * (0.05 + pages / 2.0))
    assert (dq[:, :3] == 0).all()  # strategy 0, and the strategies without an estimate
    batch = SimpleNamespace(is_repeat=np.array([True] * 6 + [False]))
    avail = np.ones((n, 4), bool)
    s, p = pol(batch, avail, cs.reshape(n, -1))
    assert s[-1] == 0 and not np.isin(s, [1, 2]).any() and (p == 1).all()
    # λ = 1: recycle while 0.05 + 0.2·(0.05 + pages/2) < 1, i.e. the deepest cache is refreshed
    assert list(s) == [3, 3, 3, 3, 3, 0, 0]
    assert ctl.lam != 1.0  # the controller saw the proxy loss of the decisions
    with np.testing.assert_raises(ValueError):
        DcafAssignment(params, np.array([0.0, 0.1]), 2.0, 2.0)


def test_the_frontier_plans_the_dcaf_family_with_its_logs():
    from comrecycle.policy.closed_loop_frontier import Job, plan

    jobs = plan([5, 7], with_estimator=False, with_dcaf=True)
    dcaf = [j for j in jobs if j.family == "dcaf"]
    assert len(dcaf) == 10 and {j.knob for j in dcaf} == {0.25, 0.5, 1.0, 2.0, 5.0}
    args = Job("dcaf", 2.0, 5).args("m", None, "p.json", 100, ("/a.parquet", "/b.parquet"))
    assert args[-8:] == ["--dcaf-logs", "/a.parquet", "/b.parquet", "--params", "p.json", "--controller",
                         "--budget", "0.02"]


def test_the_frontier_plans_the_feature_ceiling_at_its_budgets_with_its_logs():
    from comrecycle.policy.closed_loop_frontier import Job, plan

    jobs = plan([5, 7], with_estimator=False, ceiling_budgets_pct=(0.5, 1.0))
    ceiling = [j for j in jobs if j.family == "ceiling"]
    assert len(ceiling) == 4 and {j.knob for j in ceiling} == {0.5, 1.0}
    args = Job("ceiling", 1.0, 5).args("m", None, "p.json", 100, (), ("/c.parquet",))
    assert args[-7:] == ["--feature-ceiling-logs", "/c.parquet", "--params", "p.json", "--controller",
                         "--budget", "0.01"]


def test_the_frontier_warmup_reaches_every_run_and_keeps_its_runs_apart():
    from comrecycle.policy.closed_loop_frontier import Job, plan

    jobs = plan([5], with_estimator=True, oracle_budgets_pct=(1.0,), warmup=6000)
    assert jobs and all(j.warmup == 6000 for j in jobs)
    assert {j.name for j in jobs}.isdisjoint({Job(j.family, j.knob, j.seed).name for j in jobs})
    args = Job("oracle", 1.0, 5, 6000).args("m", None, "p.json", 12000)
    assert args[args.index("--warmup") + 1] == "6000" and args[args.index("--requests") + 1] == "12000"
    assert "--warmup" not in Job("oracle", 1.0, 5).args("m", None, "p.json", 12000)


class _RefreshEveryRepeat:
    """An assignment that serves strategy 0 on every request; with `shadow`, it asks the
    server to leave the cache as strategy 3 (recycle the rank list) would have."""

    def __init__(self, shadow: bool):
        self.shadow, self.cache_as = shadow, None

    def __call__(self, batch, available, cache_state):
        n = len(available)
        self.cache_as = np.where(available[:, 3], 3, 0).astype(np.int8) if self.shadow else None
        return np.zeros(n, np.int8), np.ones(n, np.float32)


def _rank_list_pages(tiny_world, tiny_cascade, shadow):
    from comrecycle.sim.env import SessionSimulator
    from comrecycle.sim.recycling import RecyclingServer

    server = RecyclingServer(tiny_world, tiny_cascade, _RefreshEveryRepeat(shadow))
    t = SessionSimulator(tiny_world, seed=3, concurrency=16).run(240, server, progress=False).table()
    state = np.stack(t["cache_state"].to_numpy(zero_copy_only=False)).reshape(len(t), 3, 3)
    rep = t["is_repeat"].to_numpy()
    return state[rep, 2, 1], (t["strategy"].to_numpy()[rep] == 0).all()  # strategy 3's list: pages served


class _RecycleEveryRepeat:
    """An assignment that serves strategy 3 wherever the rank list is available; with `shadow`,
    it asks the server to leave the cache as strategy 0 (a full refresh) would have."""

    def __init__(self, shadow: bool):
        self.shadow, self.cache_as = shadow, None

    def __call__(self, batch, available, cache_state):
        n = len(available)
        s = np.where(available[:, 3], 3, 0).astype(np.int8)
        self.cache_as = np.zeros(n, np.int8) if self.shadow else None
        return s, np.ones(n, np.float32)


def test_shadow_exploration_of_a_recycle_writes_back_the_policys_refresh(tiny_world, tiny_cascade):
    from comrecycle.sim.env import SessionSimulator
    from comrecycle.sim.recycling import RecyclingServer

    def run(shadow):
        server = RecyclingServer(tiny_world, tiny_cascade, _RecycleEveryRepeat(shadow), counterfactuals=(0,))
        t = SessionSimulator(tiny_world, seed=3, concurrency=16).run(240, server, progress=False).table()
        state = np.stack(t["cache_state"].to_numpy(zero_copy_only=False)).reshape(len(t), 3, 3)
        served = t["strategy"].to_numpy()
        return state[t["is_repeat"].to_numpy(), 2, 1], served, t

    pages, served, _ = run(False)
    assert (served == 3).sum() > 50 and pages.max() >= 3  # recycling ages the rank list
    pages, served, t = run(True)
    # recycled pages are served, but every page leaves the lists a refresh computes: one page old
    assert (served == 3).sum() > 50 and (pages[pages >= 0] == 1).all()
    q = np.stack([t[f"q_{j}"].to_numpy() for j in (0, 3)], 1)[served == 3]
    assert np.isfinite(q).all()  # q_0 (the shadow refresh) and q_3 (served) both recorded


def test_shadow_exploration_serves_the_refresh_but_keeps_the_policys_cache(tiny_world, tiny_cascade):
    pages, all_full = _rank_list_pages(tiny_world, tiny_cascade, shadow=False)
    assert all_full and (pages[pages >= 0] == 1).all()  # every page rewrote the lists
    pages, all_full = _rank_list_pages(tiny_world, tiny_cascade, shadow=True)
    # the same full pages were served, but the rank list aged as under strategy 3
    assert all_full and pages.max() >= 3 and (pages[pages >= 0] >= 1).all()


def test_a_live_batchs_observable_features_are_those_of_its_log(tiny_model_set):
    """The feature ceiling is fitted on logs and applied to live batches: both give a request
    the same features (cache state, previous clicks, gap, exposures, user features, history length)."""
    from comrecycle.policy.guards import observable_features, observable_features_of_batch
    from comrecycle.sim.env import SessionSimulator
    from comrecycle.sim.recycling import RecyclingServer, fixed_assignment, load_model_set

    world, cascade, costs = load_model_set(tiny_model_set)
    live, fixed = {}, fixed_assignment(3)

    def assign(batch, available, cache_state):
        for rid, row in zip(batch.request_id, observable_features_of_batch(batch, cache_state)):
            live[int(rid)] = row
        return fixed(batch, available, cache_state)

    server = RecyclingServer(world, cascade, assign, costs, counterfactuals=(0,))
    table = SessionSimulator(world, seed=4, concurrency=64).run(400, server, progress=False).table()
    rep = table["is_repeat"].to_numpy()
    assert rep.any() and (table["strategy"].to_numpy()[rep] == 3).any()
    logged = np.concatenate(observable_features(table), 1)
    ids = table["request_id"].to_numpy()
    decided = np.array([int(r) in live for r in ids])
    assert decided[rep].all()  # every repeat went through the decision step
    np.testing.assert_allclose(np.stack([live[int(r)] for r in ids[decided]]), logged[decided], rtol=1e-6)


def test_the_feature_ceiling_in_the_closed_loop_holds_the_true_loss(tiny_model_set, tiny_random_log):
    """CeilingAssignment decides on regressors of the true ΔQ and feeds its λ controller the
    true loss and effect of what it served (the log's q_0 and served q_j)."""
    import json

    from comrecycle.policy.frontier import FeatureCeiling

    costs = [float(v) for v in json.loads((tiny_model_set / "cost_profile.json").read_text())["strategy_cost"].values()]
    params = {"lambda": 5.0, "omega": 0.0, "choice": "argmax", "costs": costs, "budget": 0.01}
    seen = []

    class Recording(LambdaController):
        def update(self, loss, effect):
            seen.append((float(np.sum(loss)), float(np.sum(effect))))
            return super().update(loss, effect)

    ceiling = FeatureCeiling.fit(tiny_random_log)
    ctl = Recording(lam=5.0, budget=0.01)
    t, pol = simulate_policy(tiny_model_set, 500, seed=3, params=params, ceiling=ceiling, controller=ctl,
                             progress=False)
    rep, s = t["is_repeat"].to_numpy(), t["strategy"].to_numpy()
    assert (s[~rep] == 0).all() and (s[rep] > 0).any() and (s[rep] == 0).any()
    q0 = t["q_0"].to_numpy()
    served = np.array([t[f"q_{j}"][i].as_py() for i, j in enumerate(s)], float)
    true_loss, effect = np.sum(seen, axis=0)
    assert abs(true_loss - float(np.sum(q0 - served))) < 1e-3 * float(np.sum(q0))
    assert abs(effect - float(np.sum(q0))) < 1e-3 * float(np.sum(q0))
    assert abs(sum(pol.pred_loss) - true_loss) > 1e-6  # what it decided on is a prediction, not the truth
    assert len(ctl.trace) == len(pol.pred_n) > 1
