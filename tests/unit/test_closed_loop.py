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
    assert (s[~rep] == 0).all() and len(pol.pred_loss) > 0
    m = closed_loop_metrics(t, costs, estimator_cost=0.01)
    assert abs(sum(m["strategy_mix"].values()) - 1) < 1e-9
    assert m["loss_ci95"][0] <= m["effect_loss_pct"] <= m["loss_ci95"][1]
    assert m["compute_saved_pct"] < m["compute_saved_without_estimator_pct"]
    # always-full on the same seed: nothing saved, nothing lost
    full, _ = simulate_policy(tiny_model_set, 600, seed=3, strategy=0, progress=False)
    mf = closed_loop_metrics(full, costs)
    assert mf["compute_saved_pct"] == 0.0 and abs(mf["effect_loss_pct"]) < 1e-9
