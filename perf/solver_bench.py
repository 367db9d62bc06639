"""Benchmark: the policy solver on 1M requests (docs/method.md#policy; goal < 5 s).

    python -m perf.solver_bench [--requests 1000000] [--out docs/solver_bench.md]

Random predicted losses (gamma, some negative), 10% of recycling strategies unavailable, the
measured cost profile's shape. Prints and writes a Markdown table: seconds per form, λ, the
strategy mix and the realised relative loss (or compute share).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from comrecycle.policy.solver import solve_compute_budget, solve_loss_budget, solve_soft

COSTS = np.array([1.0, 0.899, 0.823, 0.051])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(a.seed)
    n = a.requests
    dq = rng.gamma(1.0, 0.1, (n, 3)) - 0.02
    q0 = rng.uniform(0.5, 3.0, n)
    avail = rng.random((n, 4)) > 0.1
    avail[:, 0] = True
    runs = [("(a) ω→0, loss budget 1%", lambda: solve_loss_budget(COSTS, dq, q0, 0.01, avail)),
            ("(b) ω=0.1, loss budget 1%", lambda: solve_soft(COSTS, dq, q0, 0.01, 0.1, avail)),
            ("(b) ω=1, loss budget 1%", lambda: solve_soft(COSTS, dq, q0, 0.01, 1.0, avail)),
            ("(c) compute budget 50%", lambda: solve_compute_budget(COSTS, dq, 0.5, avail))]
    lines = [f"Solver on {n:,} requests (K=3, 10% of recycling strategies unavailable)", "",
             "| form | seconds | multiplier | strategy mix 0/1/2/3 | loss / Σ Q_0 | compute share |",
             "|---|---|---|---|---|---|"]
    d_full = np.concatenate([np.zeros((n, 1)), dq], 1)
    for name, fn in runs:
        t = time.perf_counter()
        sol = fn()
        secs = time.perf_counter() - t
        mix = np.bincount(sol.strategy, minlength=4) / n
        lines.append(f"| {name} | {secs:.2f} | {sol.lam:.4g} | {' / '.join(f'{m:.3f}' for m in mix)} | "
                     f"{float(np.sum(sol.x * d_full)) / q0.sum():.5f} | {float(np.sum(sol.x * COSTS)) / n:.4f} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
