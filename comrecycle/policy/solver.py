"""The recycling policy's solver (docs/method.md): pure, vectorised functions.

Notation: n requests, strategies 0..K (0 = full cascade). Per request i and strategy j:
    cost c_j        [K+1]      compute units (c_0 = 1 by the cost profile's convention)
    loss ΔQ_ij      [n, K+1]   predicted effect loss, column 0 = 0 (full computation loses nothing)
    available a_ij  [n, K+1]   bool; strategy 0 is always available
The loss budget is relative: B = b · Σ_i Q_i0 (Q_i0 = predicted effect of full computation).

Three forms, all solved by bisection on the multiplier:

  (a) ω → 0, loss budget:     x_i = e_{argmin_j (c_j + λ ΔQ_ij)},  smallest λ >= 0 with Σ loss <= B
  (b) ω > 0, loss budget:     x_i = Π_simplex(-(c + λ ΔQ_i) / ω)   (exact Euclidean projection);
                               the strategy is argmax_j x_ij or a draw from x_i
  (c) compute budget (DCAF):   x_i = e_{argmin_j (ΔQ_ij + μ c_j)},  smallest μ >= 0 with Σ cost <= C

(a) and (c) are the exact solutions of the linear relaxations (multiple-choice knapsack LPs):
`Solution.x` mixes the two integral solutions that bracket the optimal multiplier so that the
budget binds exactly (at most the requests tied at λ* are fractional); `Solution.strategy` is
the integral, budget-feasible side of the bracket. Ties are broken towards the lower strategy
id (more computation), deterministically.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..rule import SolverError, project_simplex  # noqa: F401 (re-exported)

BISECTION_ITERS = 100  # float64 bisection reaches adjacent floats well before this


@dataclass(frozen=True)
class Solution:
    lam: float  # the multiplier (λ for loss budgets, μ for the compute budget)
    strategy: np.ndarray  # [n] int8, budget-feasible choice
    x: np.ndarray  # [n, K+1] float64 allocation (fractional where the relaxation needs it)
    loss: float  # Σ ΔQ of `strategy`
    cost: float  # Σ c of `strategy`
    budget: float  # the absolute budget it was solved for (B or C)
    feasible: bool  # False when even the most conservative choice violates the budget


# ---- input checks --------------------------------------------------------------------------------
def check_inputs(costs, delta_q, available=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (c [K+1] float64, ΔQ [n, K+1] float64 with column 0 = 0, available [n, K+1] bool).

    delta_q may be [n, K] (strategies 1..K, the estimator's output) or [n, K+1] (column 0 = 0).
    Unavailable entries of delta_q may be NaN; available ones must be finite."""
    c = np.asarray(costs, dtype=np.float64)
    if c.ndim != 1 or c.size < 2:
        raise SolverError(f"costs: expected a vector [K+1] with K >= 1, got shape {c.shape}")
    if not np.isfinite(c).all():
        raise SolverError(f"costs: expected finite values, got {c.tolist()}")
    if (c < 0).any():
        raise SolverError(f"costs: expected values >= 0, got {c.tolist()}")
    d = np.asarray(delta_q, dtype=np.float64)
    k1 = c.size
    if d.ndim != 2 or d.shape[1] not in (k1 - 1, k1):
        raise SolverError(f"delta_q: expected shape [n, {k1 - 1}] or [n, {k1}] for {k1} costs, got {d.shape}")
    if d.shape[1] == k1 - 1:
        d = np.concatenate([np.zeros((d.shape[0], 1)), d], axis=1)
    elif d.size and np.any(d[:, 0] != 0):
        raise SolverError("delta_q: column 0 (the full cascade) must be 0")
    if available is None:
        a = np.ones(d.shape, bool)
    else:
        a = np.asarray(available, dtype=bool)
        if a.shape != d.shape:
            raise SolverError(f"available: expected shape {d.shape}, got {a.shape}")
        a = a.copy()
    a[:, 0] = True
    bad = a & ~np.isfinite(d)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise SolverError(f"delta_q: expected finite values for available strategies, got {d[i, j]} "
                          f"at request {i}, strategy {j} ({int(bad.sum())} such values)")
    d = np.where(a, d, 0.0)
    return c, d, a


def loss_budget(b: float, q0) -> float:
    """B = b · Σ Q_i0."""
    if not np.isfinite(b) or b < 0:
        raise SolverError(f"budget: expected a relative effect loss b >= 0, got {b}")
    q0 = np.asarray(q0, dtype=np.float64)
    if not np.isfinite(q0).all():
        raise SolverError(f"q0: expected finite predicted effects, got {int((~np.isfinite(q0)).sum())} NaN/inf")
    return float(b * q0.sum())


# ---- (a) and (c): argmin forms -------------------------------------------------------------------
def _bisect_argmin(primary: np.ndarray, secondary: np.ndarray, budget: float, avail: np.ndarray):
    """Smallest m >= 0 with Σ_i secondary[i, choice_i(m)] <= budget, where
    choice_i(m) = argmin_j primary_ij + m·secondary_ij over available j (first index on ties);
    the measured sum does not increase with m.

    Bisection on an active set: a request whose choice is the same at both ends of the bracket
    keeps it inside (each line is on the lower envelope over one interval), so it leaves the
    active set and later steps only touch the requests still undecided.
    Returns (m_hi, choice_hi, choice_lo) with choice_lo from just below m_hi (or None)."""
    n = primary.shape[0]
    rows = np.arange(n)
    P = np.where(avail, primary, np.inf)
    S = np.where(avail, secondary, 0.0)

    def choose(m: float, idx=None) -> np.ndarray:
        if idx is None:
            return np.argmin(P + m * S, axis=1)
        return np.argmin(P[idx] + m * S[idx], axis=1)

    ch_lo = choose(0.0)
    if S[rows, ch_lo].sum() <= budget:
        return 0.0, ch_lo, None
    lo, hi = 0.0, 1.0
    ch_hi = choose(hi)
    while S[rows, ch_hi].sum() > budget and hi < 1e300:
        lo, ch_lo = hi, ch_hi
        hi *= 2.0
        ch_hi = choose(hi)
    active = np.flatnonzero(ch_lo != ch_hi)
    settled = S[rows, ch_hi].sum() - S[active, ch_hi[active]].sum()
    for _ in range(BISECTION_ITERS):
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi or active.size == 0:
            break
        ch = choose(mid, active)
        if settled + S[active, ch].sum() <= budget:
            hi, ch_hi[active] = mid, ch
        else:
            lo, ch_lo[active] = mid, ch
        done = ch_lo[active] == ch_hi[active]
        settled += S[active[done], ch_hi[active[done]]].sum()
        active = active[~done]
    return hi, ch_hi, ch_lo


def _mix(c_hi, c_lo, v_hi, v_lo, budget, k1):
    """x = θ·e(choice_lo) + (1-θ)·e(choice_hi) with the budget binding (θ in [0, 1])."""
    n = c_hi.size
    x = np.zeros((n, k1))
    rows = np.arange(n)
    if c_lo is None or v_lo <= v_hi:
        x[rows, c_hi] = 1.0
        return x
    theta = float(np.clip((budget - v_hi) / (v_lo - v_hi), 0.0, 1.0))
    np.add.at(x, (rows, c_hi), 1.0 - theta)
    np.add.at(x, (rows, c_lo), theta)
    return x


def solve_loss_budget(costs, delta_q, q0, b: float, available=None) -> Solution:
    """Form (a): minimise Σ c subject to Σ ΔQ <= b·Σ Q_i0. b = 0 disables recycling."""
    c, d, a = check_inputs(costs, delta_q, available)
    B = loss_budget(b, q0)
    n, k1 = d.shape
    rows = np.arange(n)
    if b == 0 or n == 0:
        s = np.zeros(n, np.int64)
        x = np.zeros((n, k1))
        x[:, 0] = 1.0
        return Solution(0.0, s.astype(np.int8), x, 0.0, float(c[0] * n), B, True)
    cost_m = np.broadcast_to(c, d.shape)
    loss_of = lambda r, ch: float(d[r, ch].sum())  # noqa: E731
    lam, hi, lo = _bisect_argmin(cost_m, d, B, a)
    feasible = loss_of(rows, hi) <= B + 1e-12 * max(1.0, abs(B))
    x = _mix(hi, lo, loss_of(rows, hi), loss_of(rows, lo) if lo is not None else 0.0, B, k1)
    return Solution(lam, hi.astype(np.int8), x, loss_of(rows, hi), float(c[hi].sum()), B, feasible)


def solve_compute_budget(costs, delta_q, compute_share: float, available=None) -> Solution:
    """Form (c), DCAF-style: minimise Σ ΔQ (maximise effect) subject to
    Σ c <= compute_share · n · c_0 (the share of always-full compute allowed)."""
    c, d, a = check_inputs(costs, delta_q, available)
    if not np.isfinite(compute_share) or compute_share < 0:
        raise SolverError(f"compute budget: expected a share of full compute >= 0, got {compute_share}")
    n, k1 = d.shape
    rows = np.arange(n)
    C = float(compute_share * n * c[0])
    cost_m = np.broadcast_to(c, d.shape)
    cost_of = lambda r, ch: float(c[ch].sum())  # noqa: E731
    mu, hi, lo = _bisect_argmin(d, cost_m, C, a)
    feasible = cost_of(rows, hi) <= C + 1e-12 * max(1.0, C)
    x = _mix(hi, lo, cost_of(rows, hi), cost_of(rows, lo) if lo is not None else 0.0, C, k1)
    return Solution(mu, hi.astype(np.int8), x, float(d[rows, hi].sum()), cost_of(rows, hi), C, feasible)


# ---- (b): ω > 0, the simplex projection ------------------------------------------------------------
def soft_allocation(costs, delta_q, lam: float, omega: float, available=None) -> np.ndarray:
    """x [n, K+1] = Π_simplex(-(c + λ ΔQ_i) / ω)."""
    c, d, a = check_inputs(costs, delta_q, available)
    return project_simplex(-(c[None, :] + lam * d) / omega, a)


def solve_soft(costs, delta_q, q0, b: float, omega: float, available=None, choice: str = "argmax",
               seed: int = 0) -> Solution:
    """Form (b): minimise Σ_i [c·x_i + ω/2 ||x_i||²] subject to Σ ΔQ·x <= B; λ by bisection on the
    expected loss (continuous in λ). choice: 'argmax' (deterministic, ties to the lower id)
    or 'sample' (x_i as a distribution, seeded)."""
    if not np.isfinite(omega) or omega <= 0:
        raise SolverError(f"omega: expected a value > 0 (use solve_loss_budget for ω → 0), got {omega}")
    if choice not in ("argmax", "sample"):
        raise SolverError(f"choice: expected 'argmax' or 'sample', got {choice!r}")
    c, d, a = check_inputs(costs, delta_q, available)
    B = loss_budget(b, q0)
    n, k1 = d.shape
    # unavailable strategies: a very negative (finite) projection input, so they get 0
    V0 = np.where(a, -c[None, :] / omega, -1e300)
    D = np.where(a, -d / omega, 0.0)

    def alloc(lam: float, idx=None) -> np.ndarray:
        return project_simplex(V0 + lam * D) if idx is None else project_simplex(V0[idx] + lam * D[idx])

    x = alloc(0.0)
    lam = 0.0
    if float(np.sum(x * d)) > B:
        lo, hi = 0.0, 1.0
        x_lo, x_hi = x, alloc(hi)
        while float(np.sum(x_hi * d)) > B and hi < 1e300:
            lo, x_lo = hi, x_hi
            hi *= 2.0
            x_hi = alloc(hi)
        # Bisection on an active set. The support of x_i(λ) is constant on an interval (the
        # critical regions of a parametric QP are convex), and on it x_i is affine in λ; so a
        # request with the same support at both ends of the bracket is settled: its x_i is the
        # interpolation between the two ends, and its loss an affine function of λ.
        seg_lo = np.full(n, lo)
        seg_hi = np.full(n, hi)
        X_lo, X_hi = x_lo, x_hi.copy()
        const, slope = 0.0, 0.0  # Σ settled loss = const + slope·λ

        def settle(idx, a_lo, a_hi, l, h):
            nonlocal const, slope
            X_lo[idx], X_hi[idx] = a_lo, a_hi
            seg_lo[idx], seg_hi[idx] = l, h
            loss_lo = np.sum(a_lo * d[idx], axis=1)
            sl = (np.sum(a_hi * d[idx], axis=1) - loss_lo) / (h - l)
            const += float(np.sum(loss_lo - sl * l))
            slope += float(np.sum(sl))

        same = ((x_lo > 0) == (x_hi > 0)).all(axis=1)
        settle(np.flatnonzero(same), x_lo[same], x_hi[same], lo, hi)
        active = np.flatnonzero(~same)
        xa_lo, xa_hi = x_lo[active], x_hi[active]
        for _ in range(BISECTION_ITERS):
            mid = 0.5 * (lo + hi)
            if not lo < mid < hi or (hi - lo) <= 1e-13 * hi:
                break
            xm = alloc(mid, active)
            if const + slope * mid + float(np.sum(xm * d[active])) <= B:
                hi, xa_hi = mid, xm
            else:
                lo, xa_lo = mid, xm
            fin = ((xa_lo > 0) == (xa_hi > 0)).all(axis=1)
            if fin.any():
                settle(active[fin], xa_lo[fin], xa_hi[fin], lo, hi)
                active, xa_lo, xa_hi = active[~fin], xa_lo[~fin], xa_hi[~fin]
        lam = hi
        w = ((lam - seg_lo) / (seg_hi - seg_lo))[:, None]
        x = X_lo + w * (X_hi - X_lo)
        x[active] = xa_hi
        x = np.maximum(x, 0.0)
    loss = lambda z: float(np.sum(z * d))  # noqa: E731
    rows = np.arange(n)
    if choice == "argmax":
        s = np.argmax(x, axis=1)
    else:
        rng = np.random.default_rng(seed)
        cum = np.cumsum(x, axis=1)
        s = np.minimum((cum < rng.random((n, 1)) * cum[:, -1:]).sum(axis=1), k1 - 1)
    return Solution(lam, s.astype(np.int8), x, float(d[rows, s].sum()), float(c[s].sum()), B,
                    loss(x) <= B + 1e-9 * max(1.0, abs(B)))
