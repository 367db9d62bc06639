"""`comrecycle simulate | simulate-feed | check-simulator`: simulated request logs and the
simulator's calibration guards."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import CliError, default_model_dir


# ---- simulate ---------------------------------------------------------------------------------
def parse_arm_weights(text: str) -> list[list[float]]:
    """'W0,W1,W2,W3[;W0,W1,W2,W3...]' -> rows of 4 positive floats (CliError otherwise)."""
    rows = []
    for part in text.split(";"):
        try:
            row = [float(x) for x in part.split(",")]
        except ValueError:
            raise CliError(f"--arm-weights: expected rows of 4 comma-separated numbers separated by ';', "
                           f"got {text!r}") from None
        if len(row) != 4 or not all(x > 0 and x < float("inf") for x in row):
            raise CliError(f"--arm-weights: expected 4 positive numbers (strategies 0..3) per row, got {part!r}")
        rows.append(row)
    return rows


def cmd_simulate_feed(a) -> int:
    from ..sim.feed_world import simulate_feed_log
    from ..sim.logs import write_log

    if a.requests < 1:
        raise CliError(f"--requests must be >= 1, got {a.requests}")
    if not 8 <= a.id_bits <= 62:
        raise CliError(f"--id-bits must be in 8..62, got {a.id_bits}")
    t = simulate_feed_log(a.requests, seed=a.seed, world_seed=a.world_seed, id_bits=a.id_bits)
    write_log(t, a.out)
    rep = t["is_repeat"].to_numpy()
    print(f"{t.num_rows:,} requests ({rep.mean():.1%} repeated) of the feed world (seed {a.world_seed}), "
          f"log seed {a.seed} -> {a.out}")
    return 0


def cmd_simulate(a) -> int:
    from ..sim.world import world_for
    from ..profiles import get_profile
    from ..sim import LoggingPolicy, SessionSimulator
    from ..sim.logs import write_log

    if a.requests < 1:
        raise CliError(f"--requests must be >= 1, got {a.requests}")
    if a.logging == "random" and a.policy != "cascade":
        raise CliError("--logging random recycles the cascade's cached stage outputs: use --policy cascade")
    if a.policy == "cascade":
        model_dir = Path(a.models or default_model_dir(a.profile))
        if not (model_dir / "manifest.json").exists():
            raise CliError(f"no model set in {model_dir}: run `python build_models.py --profile {a.profile}` "
                           f"first, pass --models DIR, or use --policy legacy")
        from ..sim.recycling import simulate_log, simulate_log_sharded

        if a.workers < 1:
            raise CliError(f"--workers must be >= 1, got {a.workers}")
        weights = None
        if a.arm_weights:
            if a.logging != "random":
                raise CliError("--arm-weights applies to --logging random")
            weights = parse_arm_weights(a.arm_weights)
        if a.no_counterfactuals and a.logging != "random":
            raise CliError("--no-counterfactuals applies to --logging random")
        cf = not a.no_counterfactuals
        if a.workers > 1:
            print(f"simulating {a.requests} requests in {a.workers} processes ...", flush=True)
            table = simulate_log_sharded(model_dir, a.requests, seed=a.seed, logging=a.logging,
                                         concurrency=a.concurrency, workers=a.workers, arm_weights=weights,
                                         counterfactuals=cf, progress=not a.quiet)
        else:
            table = simulate_log(model_dir, a.requests, seed=a.seed, logging=a.logging,
                                 concurrency=a.concurrency, progress=not a.quiet, arm_weights=weights,
                                 counterfactuals=cf)
    else:
        world = world_for(get_profile(a.profile), seed=a.world_seed)
        sim = SessionSimulator(world, seed=a.seed, concurrency=min(a.concurrency, world.n_users // 2))
        table = sim.run(a.requests, LoggingPolicy(world, a.seed), progress=not a.quiet,
                        desc="simulate (legacy)").table()
    path = write_log(table, a.out)
    er = table["expected_reward"].to_numpy()
    print(f"wrote {table.num_rows} requests to {path} (repeated {table['is_repeat'].to_numpy().mean():.1%}, "
          f"expected clicks/request {er.mean():.4f})")
    return 0


def cmd_check_simulator(a) -> int:
    from ..policy.guards import GUARDS, guard_figures, guard_markdown
    from ..sim.logs import read_log

    costs = [1.0] + [float(x) for x in a.costs.split(",")] if a.costs else None
    if costs is None:
        model_dir = Path(a.models or default_model_dir("default"))
        cp = model_dir / "cost_profile.json"
        if not cp.exists():
            raise CliError(f"no cost profile in {model_dir}: pass --models DIR (a built model set) or --costs C1,C2,C3")
        try:
            c = json.loads(cp.read_text())["strategy_cost"]
            costs = [float(c[str(j)]) for j in range(4)]
        except (KeyError, TypeError, ValueError) as e:
            raise CliError(f"{cp}: expected a cost profile with strategy_cost for strategies 0-3 "
                           f"(comrecycle profile-costs), got an error reading it: {e!r}") from None
    elif len(costs) != 4 or not all(0 <= x < float("inf") for x in costs):
        raise CliError(f"--costs: expected 3 finite numbers >= 0 (c_1,c_2,c_3; c_0 = 1), got {a.costs!r}")
    if not 0 < a.budget < 1:
        raise CliError(f"--budget: expected a fraction in (0, 1) (0.01 = 1%), got {a.budget}")
    fig = guard_figures(read_log(a.logs), costs, budget=a.budget)
    print(guard_markdown(fig))
    if a.out:
        Path(a.out).write_text(json.dumps(fig, indent=2))
        print(f"wrote {a.out}")
    failed = [text for name, _, text in GUARDS if not fig["checks"][name]]
    if failed:
        print(f"{len(failed)} of {len(GUARDS)} guards do not hold", file=sys.stderr)
    return 1 if failed else 0

def add_parsers(sub) -> None:
    """The sim commands' parsers."""
    s = sub.add_parser("simulate-feed", help="write a randomised log of the feed world, a second generator unlike the "
                                             "simulator (docs/contracts.md#contract-columns only, sparse ids, cost in ms, q_0..q_3)")
    s.add_argument("--out", required=True, help="output Parquet file")
    s.add_argument("--requests", type=int, default=60_000, help="about this many requests (whole sessions)")
    s.add_argument("--seed", type=int, default=0, help="users, sessions and draws; split logs by using several seeds")
    s.add_argument("--world-seed", type=int, default=0, help="the world itself (item pools, country effects)")
    s.add_argument("--id-bits", type=int, default=40, help="user and item ids are random ids of this many bits")
    s.set_defaults(func=cmd_simulate_feed)

    s = sub.add_parser("simulate", help="write a simulated request log (Parquet)")
    s.add_argument("--out", required=True, help="output Parquet file")
    s.add_argument("--requests", type=int, default=10_000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--logging", choices=("full", "random"), default="full",
                   help="full: strategy 0 for every request; random: repeated requests get a uniformly "
                        "random available recycling strategy (propensity logged) and the ground truth "
                        "q_0..q_3 of every strategy is computed")
    s.add_argument("--arm-weights", metavar="W0,W1,W2,W3[;W0,W1,W2,W3...]",
                   help="--logging random with these relative probabilities of strategies 0..3 instead of "
                        "uniform (propensities logged), e.g. 0.15,0.1,0.1,0.65 to explore old caches; "
                        "several ';'-separated rows make a mixture: each session uses one row (seeded), "
                        "e.g. '1,1,1,1;0.04,0.03,0.03,0.9' keeps every strategy explored and also "
                        "yields long runs of recycling (deep caches)")
    s.add_argument("--no-counterfactuals", action="store_true",
                   help="--logging random: compute q_j of the served strategy only (a training log; the "
                        "estimator learns from observed clicks). Much faster; such a log cannot be used "
                        "for exact evaluation")
    s.add_argument("--policy", choices=("cascade", "legacy"), default="cascade",
                   help="who serves the pages: the built cascade (in-process onnxruntime) or the "
                        "legacy logging policy used to bootstrap training")
    s.add_argument("--profile", default="default", help="model-set / world profile (default, tiny)")
    s.add_argument("--models", help="model set directory (default artifacts/models/PROFILE)")
    s.add_argument("--world-seed", type=int, default=0, help="world seed for --policy legacy")
    s.add_argument("--concurrency", type=int, default=256, help="concurrent simulated sessions")
    s.add_argument("--workers", type=int, default=1,
                   help="processes for --policy cascade (independent session streams, one per core)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("check-simulator", help="the simulator's calibration guards on a randomised log "
                                               "(exit 1 when one does not hold)")
    s.add_argument("--logs", required=True, help="randomised log with q_0..q_3 and cache_state "
                                                 "(comrecycle simulate --logging random)")
    s.add_argument("--models", help="model set whose cost_profile.json gives c_j (default artifacts/models/default)")
    s.add_argument("--costs", metavar="C1,C2,C3", help="strategy costs instead of --models (c_0 = 1)")
    s.add_argument("--budget", type=float, default=0.01, help="loss budget of the oracle guard (0.01 = 1%%)")
    s.add_argument("--out", help="also write the figures as JSON")
    s.set_defaults(func=cmd_check_simulator)
