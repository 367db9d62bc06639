"""Recycling inside the simulator: cache semantics, randomised logs, and the calibration guards
(README "The simulator") on the default model set, two seeds of 40k requests (slow: real
cascade runs for every strategy)."""
import numpy as np
import pytest

from comrecycle.sim.recycling import simulate_log

pytestmark = pytest.mark.slow


def test_the_simulator_serves_through_the_router_core_and_never_recycles_another_users_items(tiny_model_set):
    """Every page of a simulated log is served by recycle_router's core (memory cache): a
    recycled page only holds items of that user's own cached lists, never one they viewed."""
    from comrecycle.sim.env import SessionSimulator
    from comrecycle.sim.recycling import RecyclingServer, fixed_assignment, load_model_set

    world, cascade, costs = load_model_set(tiny_model_set)
    server = RecyclingServer(world, cascade, fixed_assignment(3), costs)
    seen: dict[int, set] = {}
    checked = 0
    sim = SessionSimulator(world, seed=4, concurrency=32)
    for _ in range(12):
        batch = sim.next_batch(limit=32)
        lists = {int(u): set(server.router.cache._decoded(server.router.cache.data[int(u)]).lists["rank"].items.tolist())
                 for u in batch.user_id if int(u) in server.router.cache.data
                 and "rank" in server.router.cache._decoded(server.router.cache.data[int(u)]).lists}
        pages = server(batch)
        outcome = sim.feedback(batch, pages)
        server.on_feedback(batch, outcome)
        for i, page in enumerate(pages):
            u, sid = int(batch.user_id[i]), int(batch.session_id[i])
            if server.last["strategy"][i] == 3:
                assert set(page.tolist()) <= lists[u]  # the user's own rank list
                assert not set(page.tolist()) & seen.get(sid, set())  # nothing they viewed
                checked += 1
            seen.setdefault(sid, set()).update(outcome.page_items[i][:int(outcome.n_viewed[i])].tolist())
    assert checked > 50  # recycled pages were checked


def test_randomised_log(tiny_model_set):
    t = simulate_log(tiny_model_set, 1200, seed=3, logging="random", concurrency=64, progress=False)
    rep = t["is_repeat"].to_numpy()
    s = t["strategy"].to_numpy()
    p = t["propensity"].to_numpy()
    q = np.stack([t[f"q_{j}"].to_numpy() for j in range(4)], 1)
    assert (s[~rep] == 0).all() and (p[~rep] == 1).all()  # initial requests always full
    counts = np.bincount(s[rep], minlength=4)
    assert counts.min() > 0.18 * rep.sum()  # ~uniform over the 4 strategies
    avail = (~np.isnan(q[rep])).sum(1)
    np.testing.assert_allclose(p[rep], 1.0 / avail, rtol=1e-6)
    served_q = q[np.arange(len(s)), s]
    np.testing.assert_allclose(served_q, t["expected_reward"].to_numpy(), rtol=1e-5)
    assert np.isnan(q[~rep, 1:]).all()
    cost = t["cost"].to_numpy()
    assert (cost[s == 0] == 1).all() and (cost[s == 3] < 0.5).all()


GUARD_REQUESTS = 40_000  # the guards are defined on randomised logs of at least 40k requests


@pytest.fixture(scope="module", params=[11, 12], ids=["seed11", "seed12"])
def guard_figures_of_seed(request, default_model_set):
    """The calibration guards on a randomised 40k-request log of one seed (ground truth q_0..q_3)."""
    from comrecycle.policy.guards import guard_figures, guard_markdown
    from comrecycle.sim.recycling import load_model_set, simulate_log_sharded

    log = simulate_log_sharded(default_model_set, GUARD_REQUESTS, seed=request.param, logging="random",
                               workers=2, progress=False)
    _, _, costs = load_model_set(default_model_set)
    fig = guard_figures(log, [costs[j] for j in range(4)])
    print(f"\nseed {request.param}\n" + guard_markdown(fig))
    return fig


def test_recycling_everything_with_strategy3_costs_5_to_15_percent(guard_figures_of_seed):
    assert 0.05 <= guard_figures_of_seed["loss_s3"] <= 0.15, guard_figures_of_seed["loss_s3"]


def test_the_loss_is_concentrated(guard_figures_of_seed):
    assert guard_figures_of_seed["top10_share"] >= 0.40, guard_figures_of_seed["top10_share"]


def test_a_one_page_old_rank_list_already_loses(guard_figures_of_seed):
    assert guard_figures_of_seed["dq3_one_page"] > 0, guard_figures_of_seed["dq3_one_page"]


def test_deeper_entry_loses_more_on_average(guard_figures_of_seed):
    d1, d2, d3 = guard_figures_of_seed["mean_dq"]
    assert d1 <= d2 <= d3, (d1, d2, d3)


def test_the_loss_grows_with_clicks_waiting_and_depth(guard_figures_of_seed):
    """Where the loss comes from: clicks on the previous page, a long gap, an old rank list."""
    f = guard_figures_of_seed
    clicks, gap, pages = f["dq3_by_prev_clicks"], f["dq3_by_gap"], f["dq3_by_pages"]
    assert clicks[0] < clicks[2], clicks
    assert gap[0] < gap[2], gap
    assert pages[0] < pages[1] < pages[2], pages


# Not met yet (README "The simulator", docs/RESULTS.md, "Why two guards do not hold"): per-request ΔQ_3 scatters 3-8 times
# more than its systematic effects (the learned stages react to the newest clicks right on
# average, scattered per request), so out-of-fold R² of ΔQ_3 gains ~0.03 from features beyond
# the cache state, and the oracle uses strategies 1-2 for ~2.3% of repeats.
# strict: these start failing the day the world meets them, so the marks are removed then.
@pytest.mark.xfail(strict=True, reason="simulator guard not met yet: R² gain ~0.03 (needs 0.15)")
def test_depth_is_not_the_whole_story(guard_figures_of_seed):
    f = guard_figures_of_seed
    assert f["r2_all"] - f["r2_cache"] >= 0.15, (f["r2_all"], f["r2_cache"])


@pytest.mark.xfail(strict=True, reason="simulator guard not met yet: oracle picks 1-2 for ~2.3% of repeats (needs 3%)")
def test_the_oracle_uses_strategies_1_and_2(guard_figures_of_seed):
    assert guard_figures_of_seed["oracle_s12_share"] >= 0.03, guard_figures_of_seed["oracle_mix"]
