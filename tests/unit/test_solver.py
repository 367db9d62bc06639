"""The policy solver against scipy's HiGHS LP and an SLSQP QP on small random instances, plus
closed forms and edge cases."""
import numpy as np
import pytest
from scipy.optimize import linprog, minimize

from comrecycle.policy.solver import (SolverError, project_simplex, solve_compute_budget, solve_loss_budget,
                                      solve_soft)

COSTS = np.array([1.0, 0.899, 0.823, 0.051])


def _instance(seed, n=12, k1=4, p_unavail=0.2):
    rng = np.random.default_rng(seed)
    c = np.sort(rng.uniform(0.05, 1.0, k1))[::-1].copy()
    c[0] = 1.0
    dq = np.concatenate([np.zeros((n, 1)), rng.gamma(1.0, 0.1, (n, k1 - 1)) - 0.02], axis=1)
    avail = rng.random((n, k1)) > p_unavail
    avail[:, 0] = True
    q0 = rng.uniform(0.5, 3.0, n)
    return c, dq, avail, q0


def _lp_loss_budget(c, dq, avail, B):
    n, k1 = dq.shape
    res = linprog(np.tile(c, n), A_ub=dq.reshape(1, -1), b_ub=[B],
                  A_eq=np.kron(np.eye(n), np.ones(k1)), b_eq=np.ones(n),
                  bounds=[(0, 1 if a else 0) for a in avail.reshape(-1)], method="highs")
    assert res.status == 0
    return res.fun


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("b", [0.005, 0.02, 0.1])
def test_loss_budget_matches_highs_lp(seed, b):
    c, dq, avail, q0 = _instance(seed)
    sol = solve_loss_budget(c, dq, q0, b, avail)
    lp = _lp_loss_budget(c, dq, avail, b * q0.sum())
    assert float(np.sum(sol.x * c)) == pytest.approx(lp, rel=1e-6, abs=1e-9)
    assert float(np.sum(sol.x * dq)) <= b * q0.sum() + 1e-9  # the relaxation meets the budget
    # the integral decision is feasible and never cheaper than the relaxation
    assert sol.feasible and sol.loss <= b * q0.sum() + 1e-9 and sol.cost >= lp - 1e-9
    assert avail[np.arange(len(c) * 0 + dq.shape[0]), sol.strategy].all()
    # at most the requests tied at λ* are fractional (generically one)
    assert ((sol.x > 1e-12) & (sol.x < 1 - 1e-12)).any(axis=1).sum() <= 2


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("share", [0.3, 0.6, 0.9])
def test_compute_budget_matches_highs_lp(seed, share):
    c, dq, avail, _ = _instance(seed)
    n, k1 = dq.shape
    sol = solve_compute_budget(c, dq, share, avail)
    C = share * n * c[0]
    res = linprog(dq.reshape(-1), A_ub=np.tile(c, n)[None], b_ub=[C], A_eq=np.kron(np.eye(n), np.ones(k1)),
                  b_eq=np.ones(n), bounds=[(0, 1 if a else 0) for a in avail.reshape(-1)], method="highs")
    if res.status == 2:  # even the cheapest choices exceed C
        assert not sol.feasible
        return
    assert float(np.sum(sol.x * dq)) == pytest.approx(res.fun, rel=1e-6, abs=1e-9)
    assert sol.cost <= C + 1e-9


def _qp_reference(c, dq, avail, B, omega):
    n, k1 = dq.shape
    f = lambda x: float(np.tile(c, n) @ x + 0.5 * omega * x @ x)  # noqa: E731
    g = lambda x: np.tile(c, n) + omega * x  # noqa: E731
    cons = [{"type": "eq", "fun": lambda x: x.reshape(n, k1).sum(1) - 1, "jac": lambda x: np.kron(np.eye(n), np.ones(k1))},
            {"type": "ineq", "fun": lambda x: np.array([B - dq.reshape(-1) @ x]), "jac": lambda x: -dq.reshape(1, -1)}]
    x0 = np.zeros(n * k1)
    x0[::k1] = 1.0
    res = minimize(f, x0, jac=g, constraints=cons, method="SLSQP",
                   bounds=[(0, 1 if a else 0) for a in avail.reshape(-1)], options={"ftol": 1e-14, "maxiter": 1000})
    assert res.success, res.message
    return res.fun


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("omega", [0.05, 0.5])
def test_soft_form_matches_qp(seed, omega):
    c, dq, avail, q0 = _instance(seed, n=6)
    b = 0.02
    sol = solve_soft(c, dq, q0, b, omega, avail)
    n = dq.shape[0]
    obj = float(np.sum(sol.x * c) + 0.5 * omega * np.sum(sol.x ** 2))
    assert obj == pytest.approx(_qp_reference(c, dq, avail, b * q0.sum(), omega), rel=1e-6)
    np.testing.assert_allclose(sol.x.sum(1), 1.0, atol=1e-12)
    assert (sol.x[~avail] == 0).all() and avail[np.arange(n), sol.strategy].all()


def test_projection_closed_forms():
    np.testing.assert_allclose(project_simplex(np.array([[0.2, 0.3, 0.5]])), [[0.2, 0.3, 0.5]])
    np.testing.assert_allclose(project_simplex(np.array([[3.0, 0.0, -1.0]])), [[1.0, 0.0, 0.0]])
    np.testing.assert_allclose(project_simplex(np.array([[1.0, 1.0, 1.0, 1.0]])), [[0.25] * 4])
    np.testing.assert_allclose(project_simplex(np.array([[5.0, 1.0, 0.9]]), np.array([[False, True, True]])),
                               [[0.0, 0.55, 0.45]])


def test_zero_budget_is_full_computation_and_a_large_one_the_cheapest():
    c, dq, avail, q0 = _instance(3, n=50, p_unavail=0.0)
    assert (solve_loss_budget(c, dq, q0, 0.0, avail).strategy == 0).all()
    big = solve_loss_budget(c, dq, q0, 100.0, avail)
    assert (big.strategy == np.argmin(c)).all() and big.lam == 0.0


def test_omega_zero_closed_form_two_requests():
    # request 0 loses 0.1 by recycling (saves 0.9), request 1 loses 0.3; budget 0.15 allows only the first
    c = np.array([1.0, 0.1])
    dq = np.array([[0.1], [0.3]])
    sol = solve_loss_budget(c, dq, q0=np.array([1.0, 0.5]), b=0.1)
    assert sol.strategy.tolist() == [1, 0]
    assert 0.9 / 0.3 <= sol.lam <= 0.9 / 0.1 + 1e-9  # between the two breakpoints c-gain / ΔQ


def test_ties_are_broken_towards_lower_strategy_ids():
    c = np.array([1.0, 0.5, 0.5])
    dq = np.zeros((4, 2))
    s = solve_loss_budget(c, dq, np.ones(4), 0.01).strategy
    assert (s == 1).all()


@pytest.mark.parametrize("kwargs,message", [
    (dict(costs=[1.0, np.nan]), "costs: expected finite values"),
    (dict(costs=[1.0, -0.1]), "costs: expected values >= 0"),
    (dict(delta_q=np.array([[np.inf]])), "delta_q: expected finite values for available strategies"),
    (dict(delta_q=np.zeros((1, 3))), "delta_q: expected shape [n, 1] or [n, 2]"),
    (dict(b=-0.01), "budget: expected a relative effect loss b >= 0"),
    (dict(q0=np.array([np.nan])), "q0: expected finite"),
])
def test_bad_inputs_are_clear_errors(kwargs, message):
    args = dict(costs=[1.0, 0.2], delta_q=np.array([[0.1]]), q0=np.array([1.0]), b=0.01)
    args.update(kwargs)
    with pytest.raises(SolverError, match=message.replace("[", r"\[").replace("]", r"\]")):
        solve_loss_budget(**args)


def test_nan_loss_of_an_unavailable_strategy_is_fine():
    sol = solve_loss_budget([1.0, 0.2], np.array([[np.nan], [0.01]]), np.ones(2), 0.5,
                            available=np.array([[True, False], [True, True]]))
    assert sol.strategy.tolist() == [0, 1]


def test_soft_choice_by_sampling_is_seeded_and_follows_x():
    c, dq, avail, q0 = _instance(1, n=4000, p_unavail=0.0)
    a = solve_soft(c, dq, q0, 0.02, 0.2, avail, choice="sample", seed=1)
    b = solve_soft(c, dq, q0, 0.02, 0.2, avail, choice="sample", seed=1)
    np.testing.assert_array_equal(a.strategy, b.strategy)
    freq = np.bincount(a.strategy, minlength=4) / len(a.strategy)
    np.testing.assert_allclose(freq, a.x.mean(0), atol=0.03)


def test_without_credit_for_gains_the_budget_counts_only_predicted_losses():
    import pyarrow as pa

    from comrecycle.policy.decide import policy_dq, solve_params

    dq = np.array([[0.0, -0.3, -0.2, -0.4], [0.0, 0.2, 0.1, 0.5]])
    assert policy_dq(dq, {}) is dq
    np.testing.assert_array_equal(policy_dq(dq, {"credit_gains": False}), np.maximum(dq, 0.0))
    # two repeated requests, Q_0 = 10 each, a 2% budget = 0.4: strategy 3 everywhere spends
    # -0.4 + 0.5 = 0.1 net, but 0.5 without credit for the first request's gain
    log = pa.table({"is_repeat": [True, True], "reward": [10.0, 10.0]})
    q_hat = np.full((2, 4), 10.0)
    costs = np.array([1.0, 0.9, 0.8, 0.05])
    net = solve_params(log, q_hat, dq, costs, 0.02)
    strict = solve_params(log, q_hat, dq, costs, 0.02, credit_gains=False)
    assert net["predicted"]["strategy_mix"]["3"] == 1.0 and net["credit_gains"]
    assert strict["predicted"]["strategy_mix"]["3"] == 0.5 and not strict["credit_gains"]
    assert strict["lambda"] > net["lambda"]
