"""λ certified off-policy (policy/certify.py): the DR loss of the deployed rule, its interval,
the choice of λ and the noise floor, on synthetic logs whose truth is known."""
import numpy as np
import pytest

from comrecycle.policy.certify import (_clustered, _dr_terms, certify_lambda, lambda_grid, rule_allocation,
                                       z_of)
from comrecycle.policy.solver import SolverError, solve_loss_budget

COSTS = np.array([1.0, 0.7, 0.5, 0.05])


def synthetic(n_sessions: int, seed: int, pages: int = 4):
    """Sessions of `pages` requests (the first initial); true q [n, 4]; uniform logging on repeats;
    Poisson clicks. The loss of recycling is heterogeneous: ΔQ_j = q0 · share_j · h with h a
    per-request log-normal."""
    rng = np.random.default_rng(seed)
    n = n_sessions * pages
    session = np.repeat(np.arange(n_sessions), pages)
    rep = np.tile(np.arange(pages) > 0, n_sessions)
    q0 = rng.gamma(4.0, 0.4, n)
    h = np.exp(rng.normal(-2.5, 1.0, n))
    q = q0[:, None] * (1 - np.minimum(0.95, np.array([0.0, 0.3, 0.6, 1.0])[None, :] * h[:, None]))
    t = np.where(rep, rng.integers(0, 4, n), 0)
    p = np.where(rep, 0.25, 1.0)
    r = rng.poisson(q[np.arange(n), t]).astype(float)
    return dict(q=q, t=t, p=p, r=r, session=session, rep=rep)


def true_loss_pct(q, s):
    return 100 * (q[:, 0] - q[np.arange(len(s)), s]).sum() / q[:, 0].sum()


def test_confidence_levels():
    assert z_of(0.5) == 0.0
    assert z_of(0.95) == pytest.approx(1.6449, abs=1e-4)
    for bad in (0.4, 1.0, float("nan")):
        with pytest.raises(SolverError, match=r"confidence: expected a level in \[0.5, 1\)"):
            z_of(bad)


def test_dr_is_exact_without_noise_for_any_model():
    """r = q_t (no click noise): the correction term makes any q̂ give the true loss."""
    w = synthetic(500, 0)
    rng = np.random.default_rng(1)
    q_hat = w["q"] * rng.uniform(0.5, 1.5, w["q"].shape)  # a wrong model
    r = w["q"][np.arange(len(w["t"])), w["t"]]
    s = np.where(w["rep"], rng.integers(0, 4, len(r)), 0)
    res = r - q_hat[np.arange(len(r)), w["t"]]
    d = _dr_terms(s, q_hat, w["t"], 1 / w["p"], res)
    v = np.where(w["rep"], q_hat[:, 0] + (w["t"] == 0) / w["p"] * res, r)
    # unbiased, not exact per draw: the IPW correction of a wrong model still varies with t;
    # with a perfect model it is exact
    d_exact = _dr_terms(s, w["q"], w["t"], 1 / w["p"], r - w["q"][np.arange(len(r)), w["t"]])
    assert d_exact.sum() / w["q"][:, 0].sum() * 100 == pytest.approx(true_loss_pct(w["q"], s), rel=1e-9)
    assert np.isfinite(d).all() and np.isfinite(v).all()


def test_dr_unbiased_and_covered_with_a_wrong_model():
    """Over independent logs, the DR loss of a fixed rule centres on the truth even with a biased
    q̂, and the 90% interval covers the truth about 90% of the time."""
    ests, covered, truths = [], 0, []
    z = z_of(0.95)
    reps = 60
    for seed in range(reps):
        w = synthetic(1500, 100 + seed)
        n = len(w["t"])
        q_hat = w["q"] * 0.8 + 0.1  # biased
        s = np.where(w["rep"], (np.arange(n) % 4), 0)
        res = w["r"] - q_hat[np.arange(n), w["t"]]
        d = np.where(w["rep"], _dr_terms(s, q_hat, w["t"], 1 / w["p"], res), 0.0)
        v = np.where(w["rep"], q_hat[:, 0] + (w["t"] == 0) / w["p"] * res, w["r"])
        L, se = _clustered(d, v, w["session"], int(w["session"].max()) + 1)
        truth = true_loss_pct(w["q"], s)
        ests.append(100 * L)
        truths.append(truth)
        covered += abs(100 * L - truth) <= z * 100 * se
    ests, truths = np.array(ests), np.array(truths)
    bias = (ests - truths).mean()
    assert abs(bias) < 3 * (ests - truths).std() / np.sqrt(reps)
    assert 0.78 <= covered / reps <= 0.98


def test_certified_lambda_holds_the_budget_where_the_estimator_is_optimistic():
    """An estimator that predicts a third of the true loss: λ solved on its own prediction
    overspends the budget several times; λ whose 95% bound is certified on a held-out log does
    not. (With the point estimate, confidence 0.5, the realised loss of one log lands within
    about ±2 standard errors of the budget: 0.5 points on this log.)"""
    solve, test = synthetic(20_000, 7), synthetic(20_000, 8)
    b = 0.01
    out = {}
    for name, w in (("solve", solve), ("test", test)):
        dq_true = w["q"][:, :1] - w["q"]
        out[name] = (dq_true / 3.0, w["q"] + np.where(np.arange(4) > 0, dq_true * (2 / 3), 0.0))
    dq_s, qh_s = out["solve"]
    avail = np.tile(solve["rep"][:, None], (1, 4))
    avail[:, 0] = True
    rep = solve["rep"]
    q0 = qh_s[:, 0]
    naive = solve_loss_budget(COSTS, dq_s[rep], q0[rep], b * q0.sum() / q0[rep].sum(), avail[rep])
    cert = certify_lambda(COSTS, dq_s, avail, qh_s, solve["t"], solve["p"], solve["r"], solve["session"],
                          solve["rep"], b, confidence=0.95)
    assert cert.certified
    dq_t, _ = out["test"]
    avail_t = np.tile(test["rep"][:, None], (1, 4))
    avail_t[:, 0] = True
    loss = {}
    for name, lam in (("naive", naive.lam), ("certified", cert.lam)):
        s = rule_allocation(COSTS, dq_t, avail_t, lam)
        s[~test["rep"]] = 0
        loss[name] = true_loss_pct(test["q"], s)
    assert loss["naive"] > 2.0 * 100 * b
    assert loss["certified"] <= 100 * b
    assert cert.saved_pct > 5.0


def test_chosen_lambda_keeps_every_larger_lambda_within_the_budget():
    w = synthetic(3_000, 3)
    dq = w["q"][:, :1] - w["q"]
    avail = np.tile(w["rep"][:, None], (1, 4))
    avail[:, 0] = True
    cert = certify_lambda(COSTS, dq, avail, w["q"], w["t"], w["p"], w["r"], w["session"], w["rep"], 0.02,
                          confidence=0.9)
    c = cert.curve
    bound = c.loss_pct + cert.z * c.se_pct
    k = int(np.searchsorted(c.lam, cert.lam))
    assert cert.certified and (bound[k:] <= 2.0 + 1e-9).all()
    assert k == 0 or bound[k - 1:].max() > 2.0  # the one before would not do
    assert cert.bound_pct == pytest.approx(cert.loss_pct + cert.z * cert.se_pct)
    assert np.all(np.diff(c.lam) > 0) and np.all(np.diff(c.saved_pct) <= 1e-9)  # larger λ recycles less


def test_small_log_reports_its_noise_floor():
    """On a small log the 95% bound of any rule that recycles much is far above a tight budget:
    the certified rule recycles little and the noise floor says from where on it can do more."""
    w = synthetic(4000, 4)
    dq = w["q"][:, :1] - w["q"]
    avail = np.tile(w["rep"][:, None], (1, 4))
    avail[:, 0] = True
    args = (COSTS, dq, avail, w["q"], w["t"], w["p"], w["r"], w["session"], w["rep"])
    tight = certify_lambda(*args, 0.001, confidence=0.95)
    assert tight.certified  # the family ends at "always full": some λ always qualifies
    assert np.isfinite(tight.floor_pct) and tight.floor_pct > 0.5 > 100 * tight.budget
    assert tight.as_dict()["below_noise_floor"] is True
    point = certify_lambda(*args, 0.001, confidence=0.5)
    recycled = lambda c: c.curve.recycled[np.searchsorted(c.curve.lam, c.lam)]  # noqa: E731
    assert recycled(tight) < 0.5 * recycled(point)
    loose = certify_lambda(*args, min(0.99, (tight.floor_pct + 1.0) / 100), confidence=0.95)
    assert loose.as_dict()["below_noise_floor"] is False
    assert loose.bound_pct <= 100 * loose.budget and recycled(loose) > recycled(tight)
    # a log so small that no rule's loss stands out of its noise: no finite floor
    w = synthetic(200, 4)
    tiny = certify_lambda(COSTS, w["q"][:, :1] - w["q"], avail[:800], w["q"], w["t"], w["p"], w["r"], w["session"],
                          w["rep"], 0.01, confidence=0.95)
    assert tiny.floor_pct == float("inf") and tiny.as_dict()["floor_pct"] is None


def test_lambda_grid_spans_every_switch():
    rng = np.random.default_rng(0)
    dq = np.abs(rng.normal(0.1, 0.1, (500, 4)))
    dq[:, 0] = 0
    avail = np.ones((500, 4), bool)
    g = lambda_grid(COSTS, dq, avail, 64)
    assert g[0] == 0 and np.all(np.diff(g) > 0)
    assert (rule_allocation(COSTS, dq, avail, float(g[-1])) == 0).all()  # beyond the last switch: full
    assert (rule_allocation(COSTS, dq, avail, 0.0) == 3).all()  # λ = 0: the cheapest


def test_sampled_rule_is_evaluated_in_expectation():
    w = synthetic(300, 5)
    n = len(w["t"])
    dq = w["q"][:, :1] - w["q"]
    avail = np.tile(w["rep"][:, None], (1, 4))
    avail[:, 0] = True
    x = rule_allocation(COSTS, dq, avail, 3.0, omega=0.2, choice="sample")
    assert x.shape == (n, 4) and np.allclose(x.sum(1), 1)
    r = w["q"][np.arange(n), w["t"]]  # noise-free, perfect model: exact
    d = _dr_terms(x, w["q"], w["t"], 1 / w["p"], r - w["q"][np.arange(n), w["t"]])
    assert d.sum() == pytest.approx((x * (w["q"][:, :1] - w["q"])).sum(), rel=1e-9)


def test_refuses_inputs_it_cannot_use():
    w = synthetic(50, 6)
    dq = w["q"][:, :1] - w["q"]
    avail = np.ones((len(dq), 4), bool)
    with pytest.raises(SolverError, match="budget"):
        certify_lambda(COSTS, dq, avail, w["q"], w["t"], w["p"], w["r"], w["session"], w["rep"], 1.5)
    with pytest.raises(SolverError, match="propensities"):
        certify_lambda(COSTS, dq, avail, w["q"], w["t"], w["p"] * 0, w["r"], w["session"], w["rep"], 0.01)
    with pytest.raises(SolverError, match="no repeated requests"):
        certify_lambda(COSTS, dq, avail, w["q"], w["t"], w["p"], w["r"], w["session"], w["rep"] & False, 0.01)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_pass_path_equals_evaluating_every_lambda(seed):
    """The ω = 0 curve is computed in one pass over the rule's switches; it must equal the
    rule evaluated from scratch at every grid λ (ω > 0 takes that slow path)."""
    from comrecycle.policy.certify import _clustered

    w = synthetic(400, 20 + seed)
    rng = np.random.default_rng(seed)
    n = len(w["t"])
    dq = w["q"][:, :1] - w["q"] + rng.normal(0, 0.05, (n, 4))
    dq[:, 0] = 0
    dq[rng.random((n, 4)) < 0.05] = 0.0  # ties between strategies
    avail = np.tile(w["rep"][:, None], (1, 4)) & (rng.random((n, 4)) > 0.2)
    avail[:, 0] = True
    q_hat = w["q"] * rng.uniform(0.8, 1.2, w["q"].shape)
    cert = certify_lambda(COSTS, dq, avail, q_hat, w["t"], w["p"], w["r"], w["session"], w["rep"], 0.02,
                          confidence=0.9, grid=64)
    rep = w["rep"]
    res = w["r"] - q_hat[np.arange(n), w["t"]]
    v = np.where(rep, q_hat[:, 0] + (w["t"] == 0) / w["p"] * res, w["r"])
    for k, lam in enumerate(cert.curve.lam):
        s = rule_allocation(COSTS, dq, avail, float(lam))
        d = np.where(rep, _dr_terms(s, q_hat, w["t"], 1 / w["p"], res), 0.0)
        L, se = _clustered(d, v, w["session"], int(w["session"].max()) + 1)
        assert cert.curve.loss_pct[k] == pytest.approx(100 * L, abs=1e-9)
        assert cert.curve.se_pct[k] == pytest.approx(100 * se, rel=1e-6, abs=1e-9)
        assert cert.curve.recycled[k] == pytest.approx(np.mean(s[rep] != 0), abs=1e-12)


def test_interval_label_names_what_ci_pct_is():
    from comrecycle.policy.certify import interval_label

    assert interval_label(0.5) == "95% interval"
    assert interval_label(0.95) == "90% interval, its upper end the 95% bound"
