"""`comrecycle` — the project's one console script.

  comrecycle simulate       write a simulated request log (docs/contracts.md#request-log-schema)
  comrecycle check-simulator  the simulator's calibration guards on a randomised log (ground truth q_j)
  comrecycle build-models   train the four stages, export ONNX, install the model repository
  comrecycle train-estimator  fit + evaluate the effect-loss estimator on a randomised log
  comrecycle calibrate-estimator  per-depth calibration of ΔQ̂ on a held-out randomised log
  comrecycle solve          λ for a loss budget (estimator + log) -> params JSON
  comrecycle decide         one strategy per logged request with those params
  comrecycle evaluate       off-policy compute saved / effect loss (IPW, SNIPW, DR, exact)
  comrecycle frontier       compute saved vs loss of every policy on a log (table + PNG)
  comrecycle closed-loop    a policy inside the simulator: realised loss on its own cache states
  comrecycle closed-loop-frontier  every policy family over its knob and seeds, in the closed loop
  comrecycle profile-costs  re-measure per-stage cost and the strategy cost profile c_j
  comrecycle install-estimator  install a trained estimator as a new `estimator` version
  comrecycle install-params  install router params (solve) as a new `recycle_router` version
  comrecycle serve          run the embedded tritonserver on a model repository (--with-redis)
  comrecycle replay         replay simulated sessions against a running server
  comrecycle perf           perf_analyzer on `cascade` and the trivial-model floor (CSV)
  comrecycle demo           the main job: build if needed, serve, replay, report
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .errors import ComRecycleError, UserError
from .repository import DEFAULT_REPOSITORY, REPO_ROOT

log = logging.getLogger("comrecycle")
ARTIFACTS = REPO_ROOT / "artifacts"


def default_model_dir(profile: str) -> Path:
    return ARTIFACTS / "models" / profile


class CliError(UserError):
    """A user error: printed without a traceback, exit code 2."""


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
    from .sim.feed_world import simulate_feed_log
    from .sim.logs import write_log

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
    from .build import world_for
    from .profiles import get_profile
    from .sim import LoggingPolicy, SessionSimulator
    from .sim.logs import write_log

    if a.requests < 1:
        raise CliError(f"--requests must be >= 1, got {a.requests}")
    if a.logging == "random" and a.policy != "cascade":
        raise CliError("--logging random recycles the cascade's cached stage outputs: use --policy cascade")
    if a.policy == "cascade":
        model_dir = Path(a.models or default_model_dir(a.profile))
        if not (model_dir / "manifest.json").exists():
            raise CliError(f"no model set in {model_dir}: run `python build_models.py --profile {a.profile}` "
                           f"first, pass --models DIR, or use --policy legacy")
        from .sim.recycling import simulate_log, simulate_log_sharded

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
    from .sim.guards import GUARDS, guard_figures, guard_markdown
    from .sim.logs import read_log

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


# ---- estimator -------------------------------------------------------------------------------------
def cmd_train_estimator(a) -> int:
    from .estimator.train_cli import train_and_evaluate

    if not 0 <= a.min_epochs <= a.max_epochs:
        raise CliError(f"--min-epochs must be in 0..--max-epochs ({a.max_epochs}), got {a.min_epochs}")
    if not 0 <= a.average_epochs <= a.max_epochs:
        raise CliError(f"--average-epochs must be in 0..--max-epochs ({a.max_epochs}), got {a.average_epochs}")
    try:
        res = train_and_evaluate(a.logs, a.out, eval_logs=a.eval_logs, holdout=a.holdout, seed=a.seed,
                                 max_epochs=a.max_epochs, progress=not a.quiet, baselines=not a.no_baselines,
                                 min_epochs=a.min_epochs, list_origin=not a.no_list_origin, label=a.label,
                                 average_epochs=a.average_epochs, select=a.select)
    except UserError as e:
        raise CliError(str(e)) from None
    for name, m in res["metrics"].items():
        parts = []
        for j, tm in sorted(m["per_treatment"].items(), key=lambda kv: int(kv[0])):
            s = f"j={j}: qini {tm['qini']:.4f} auuc {tm['auuc']:.4f}"
            if "spearman" in tm:
                s += f" spearman {tm['spearman']:.3f}"
            parts.append(s)
        print(f"{name:24s} " + " | ".join(parts))
    print(f"wrote {a.out}/estimator.onnx, manifest.json, report.md, uplift_curves.png, metrics.json")
    if a.install:
        from .repository import install_estimator

        dst = install_estimator(a.install, a.out)
        print(f"installed as {dst}")
    return 0


def cmd_calibrate_estimator(a) -> int:
    import shutil

    from .estimator.estimator import EffectLossEstimator
    from .estimator.train_cli import read_training_logs

    src = Path(a.estimator)
    if not (src / "manifest.json").exists():
        raise CliError(f"--estimator {src}: expected a directory written by train-estimator (manifest.json)")
    out = Path(a.out) if a.out else src
    try:
        table = read_training_logs(a.logs)
        est = EffectLossEstimator.load(src).calibrate(table, label=a.label, max_depth=a.max_depth,
                                                      min_rows=a.min_rows)
    except UserError as e:
        raise CliError(str(e)) from None
    if out != src:
        shutil.copytree(src, out, dirs_exist_ok=True)
    extra = {k: v for k, v in est.manifest_.items() if k not in ("params", "fit", "uses_cache_state", "calibrated")}
    extra["calibration_log"] = ", ".join(map(str, a.logs))
    est.save(out, extra=extra)
    print(f"{'strategy':>8s} {'depth':>5s} {'rows':>7s} {'DR mean':>8s} {'± se':>6s} {'isotonic':>8s} "
          f"{'ΔQ̂ mean':>8s} {'offset':>7s}")
    warnings = []
    for j, r in est.calibration_.report["strategies"].items():
        if "skipped" in r:
            print(f"{j:>8s} skipped: {r['skipped']}")
            if r.get("unexplored"):
                warnings.append(f"WARNING: strategy {j} is not calibrated (offsets 0): {r['skipped']}. Calibrate on "
                                "a log that explores it (`comrecycle simulate --logging random`), or keep it out "
                                f"of the policy (`solve --strategies` without {j}).")
            continue
        for k, d in enumerate(r["depths"]):
            print(f"{j:>8s} {d:>5d} {r['rows'][k]:>7d} {r['dr_mean'][k]:>8.3f} {r['dr_se'][k]:>6.3f} "
                  f"{r['isotonic'][k]:>8.3f} {r['predicted_mean'][k]:>8.3f} {r['offset'][k]:>7.3f}")
    for w in warnings:
        print(w)
    print(f"wrote {out}/calibration.json and the calibrated {out}/estimator.onnx")
    return 0


# ---- build / costs ------------------------------------------------------------------------------
def cmd_build_models(a) -> int:
    sys.argv = ["build_models.py"]
    from .build_cli import main as build_main

    return build_main(a.rest)


def cmd_profile_costs(a) -> int:
    from .runtime.cascade import InProcessCascade
    from .runtime.costs import cost_profile
    from .build import world_for
    from .sim import SessionSimulator

    model_dir = Path(a.models or default_model_dir(a.profile))
    if not (model_dir / "manifest.json").exists():
        raise CliError(f"no model set in {model_dir} (run build_models.py first)")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    world = world_for(manifest)
    batch = SessionSimulator(world, seed=a.seed, concurrency=max(a.batch_size, 8)).next_batch()
    cascade = InProcessCascade.load(model_dir)
    prof = cost_profile(cascade, [batch.context(i) for i in range(len(batch))], batch_size=a.batch_size,
                        repeats=a.repeats)
    out = Path(a.out or model_dir / "cost_profile.json")
    out.write_text(json.dumps(prof, indent=2))
    print(json.dumps({"seconds_per_request": prof["seconds_per_request"],
                      "strategy_cost": prof["strategy_cost"]}, indent=2))
    print(f"wrote {out}")
    return 0


# ---- serve / replay / perf / demo ---------------------------------------------------------------
def _check_repository(repo: Path) -> dict:
    mpath = repo / "manifest.json"
    if not mpath.exists():
        raise CliError(f"{repo} has no installed model set (no manifest.json): run "
                       f"`python build_models.py` first")
    return json.loads(mpath.read_text())


def cmd_serve(a) -> int:
    import contextlib
    import os

    from .repository import load_plan
    from .serving.server import main as server_main

    repo = Path(a.repository)
    _check_repository(repo)
    args = ["--model-repository", str(repo), "--http-port", str(a.http_port), "--grpc-port", str(a.grpc_port),
            "--metrics-port", str(a.metrics_port), "--model-control", "explicit"]
    models, skipped = load_plan(repo)
    for m in models:
        args += ["--load-model", m]
    for name, reason in skipped.items():
        log.warning("not loading %s: %s", name, reason)
    with contextlib.ExitStack() as stack:
        if a.with_redis:
            from .serving.redis_server import RedisServer, RedisStartError

            try:
                redis_srv = stack.enter_context(RedisServer(a.redis_port or None, maxmemory=a.redis_maxmemory))
            except RedisStartError as e:
                raise CliError(f"--with-redis: {e}") from None
            os.environ["COMRECYCLE_REDIS_URL"] = redis_srv.url  # inherited by tritonserver and the router
            log.info("redis-server %s on %s (memory only; stopped with the server)", redis_srv.pid, redis_srv.url)
        elif "recycle_router" in models:
            log.info("recycle_router will use Redis at %s (COMRECYCLE_REDIS_URL; --with-redis starts one)",
                     os.environ.get("COMRECYCLE_REDIS_URL", "redis://127.0.0.1:6379/0"))
        return server_main(args)


def cmd_install_estimator(a) -> int:
    from .repository import install_estimator

    dst = install_estimator(a.repository, a.estimator, version=a.version)
    print(f"installed {a.estimator} as {dst} (estimator version {dst.name})")
    print(f"a running server (explicit model control) loads it with: curl -X POST "
          f"localhost:8000/v2/repository/models/estimator/load; `comrecycle serve` loads the latest version")
    return 0


def cmd_install_params(a) -> int:
    from .repository import install_router_params

    dst = install_router_params(a.repository, a.params, estimator_version=a.estimator_version, version=a.version)
    est = json.loads((dst / "params.json").read_text())["estimator_model_version"]
    print(f"installed {a.params} as {dst} (recycle_router version {dst.name}, calling estimator version {est})")
    print("a running server (explicit model control) switches to it with: curl -X POST "
          "localhost:8000/v2/repository/models/recycle_router/load (no downtime)")
    return 0


def cmd_replay(a) -> int:
    from client.replay import main as replay_main

    args = ["--url", a.url, "--protocol", a.protocol, "--repository", a.repository, "--requests",
            str(a.requests), "--concurrency", str(a.concurrency), "--seed", str(a.seed), "--model", a.model]
    if a.json:
        args += ["--json", a.json]
    return replay_main(args, prog="comrecycle replay")


def cmd_perf(a) -> int:
    from perf.cascade_perf import main as perf_main

    return perf_main(a.rest)


def cmd_demo(a) -> int:
    from .demo import run_demo

    if a.requests < 1 or a.concurrency < 1:
        raise CliError(f"--requests and --concurrency must be >= 1, got {a.requests}, {a.concurrency}")
    if not 0 < a.budget < 1:
        raise CliError(f"--budget is a relative loss in (0, 1), e.g. 0.01 for 1%; got {a.budget}")
    if a.max_pages < 0:
        raise CliError(f"--max-pages must be >= 0 (0 = no depth guard), got {a.max_pages}")
    if not 0.5 <= a.confidence < 1:  # before minutes of simulation, not when `solve` gets it
        raise CliError(f"--confidence: expected a level in [0.5, 1) (0.95 = a 95% upper bound), got {a.confidence:g}")
    if a.train_requests < 1000 or a.certify_requests < 1000:
        raise CliError(f"--train-requests and --certify-requests: expected at least 1000 requests each, got "
                       f"{a.train_requests}, {a.certify_requests}")
    return run_demo(a)


def build_parser() -> argparse.ArgumentParser:
    from .estimator.labels import LABELS
    ap = argparse.ArgumentParser(prog="comrecycle", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

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

    s = sub.add_parser("train-estimator", help="train the effect-loss estimator on a randomised log, "
                                               "evaluate it, write ONNX + manifest + report")
    s.add_argument("--logs", required=True, nargs="+",
                   help="randomised log(s) (comrecycle simulate --logging random); several are concatenated")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--eval-logs", help="held-out randomised log (default: hold out --holdout of the sessions)")
    s.add_argument("--holdout", type=float, default=0.2)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-epochs", type=int, default=15)
    s.add_argument("--min-epochs", type=int, default=0,
                   help="train at least this many epochs before early stopping may stop or pick an epoch "
                        "(the validation loss favours epoch 2-5, before the uplift towers learn the depth "
                        "effect; 8 learns it on the 520k-request logs, docs/RESULTS.md)")
    s.add_argument("--average-epochs", type=int, default=0, metavar="N",
                   help="train all --max-epochs and keep the average of the weights of the last N epochs "
                        "(stochastic weight averaging) instead of the best epoch; for noisy labels")
    s.add_argument("--no-list-origin", action="store_true",
                   help="leave out the list-origin feature (the session page each cached list was computed "
                        "for), as estimators trained before it had (docs/RESULTS.md)")
    s.add_argument("--label", choices=LABELS, default="clicks",
                   help="what the estimator learns from: the logged clicks, or view-adjusted clicks (the "
                        "scrolling-depth noise removed by a control variate, unbiased under position-based "
                        "examination; needs the n_viewed, page_items and clicked_items columns; "
                        "docs/RESULTS.md)")
    s.add_argument("--select", choices=("outcome", "uplift"), default="outcome",
                   help="what early stopping and the choice of epoch watch on the validation sessions: the loss of "
                        "the logged reward (outcome) or minus the summed IPW Qini of ΔQ̂_j (uplift; on the feed "
                        "world it ranked worse, docs/RESULTS.md)")
    s.add_argument("--no-baselines", action="store_true", help="skip the T-learner and constant baselines")
    s.add_argument("--install", metavar="REPO", help="install as a new version of `estimator` in REPO")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_train_estimator)

    s = sub.add_parser("calibrate-estimator",
                       help="fit the per-depth calibration of ΔQ̂ on a held-out randomised log "
                            "(doubly-robust, isotonic in depth) and graft it into the ONNX model")
    s.add_argument("--estimator", required=True, help="directory written by train-estimator")
    s.add_argument("--logs", required=True, nargs="+",
                   help="randomised log(s) the estimator was NOT trained on, with cache_state")
    s.add_argument("--out", help="write the calibrated estimator here (default: in place)")
    s.add_argument("--max-depth", type=int, default=12, help="deeper cached lists share this depth's offset")
    s.add_argument("--label", choices=LABELS,
                   help="reward of the doubly-robust means: clicks or view-adjusted clicks (default: the "
                        "label the estimator was trained on)")
    s.add_argument("--min-rows", type=int, default=400,
                   help="depths with fewer usable rows are pooled into the deepest well-measured one")
    s.set_defaults(func=cmd_calibrate_estimator)

    from .policy.commands import add_parsers as add_policy_parsers
    add_policy_parsers(sub, str(default_model_dir("default") / "cost_profile.json"))

    s = sub.add_parser("build-models", help="train, export and install the stage models "
                                            "(same as python build_models.py; options after --)",
                       add_help=True)
    s.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of build_models.py (try -- --help)")
    s.set_defaults(func=cmd_build_models)

    s = sub.add_parser("profile-costs", help="measure per-stage cost and c_j of strategies 0-3")
    s.add_argument("--profile", default="default")
    s.add_argument("--models", help="model set directory (default artifacts/models/PROFILE)")
    s.add_argument("--batch-size", type=int, default=8, help="reference batch size (requests per call)")
    s.add_argument("--repeats", type=int, default=7)
    s.add_argument("--seed", type=int, default=3)
    s.add_argument("--out", help="output JSON (default MODELS/cost_profile.json)")
    s.set_defaults(func=cmd_profile_costs)

    s = sub.add_parser("serve", help="run the embedded tritonserver in the foreground")
    s.add_argument("--repository", default=str(DEFAULT_REPOSITORY["cpu"]))
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--with-redis", action="store_true",
                   help="also start a loopback redis-server (memory only) for recycle_router's cache, stopped "
                        "with the server; otherwise the router uses $COMRECYCLE_REDIS_URL "
                        "(default redis://127.0.0.1:6379/0)")
    s.add_argument("--redis-port", type=int, default=0, help="--with-redis: its port (0 = a free one, printed)")
    s.add_argument("--redis-maxmemory", default="256mb", help="--with-redis: maxmemory (allkeys-lru eviction)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("install-estimator", help="install a trained estimator as a new version of `estimator`")
    s.add_argument("--estimator", required=True, help="directory written by `comrecycle train-estimator --out`")
    s.add_argument("--repository", default=str(DEFAULT_REPOSITORY["cpu"]))
    s.add_argument("--version", type=int, help="version number (default: the highest installed + 1)")
    s.set_defaults(func=cmd_install_estimator)

    s = sub.add_parser("install-params", help="install router params (`comrecycle solve`) as a new version of "
                                              "recycle_router")
    s.add_argument("--params", required=True, help="params JSON written by `comrecycle solve --out`")
    s.add_argument("--repository", default=str(DEFAULT_REPOSITORY["cpu"]))
    s.add_argument("--estimator-version", type=int,
                   help="estimator version the router calls (default: the latest installed)")
    s.add_argument("--version", type=int, help="version number (default: the highest installed + 1)")
    s.set_defaults(func=cmd_install_params)

    s = sub.add_parser("replay", help="replay simulated sessions against a running server")
    s.add_argument("--url", default="127.0.0.1:8001", help="host:port of the server's gRPC (or HTTP) port")
    s.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    s.add_argument("--repository", default=str(DEFAULT_REPOSITORY["cpu"]),
                   help="the served model repository (its manifest names the simulated world)")
    s.add_argument("--requests", type=int, default=2000, help="requests to replay")
    s.add_argument("--concurrency", type=int, default=16, help="concurrent simulated sessions")
    s.add_argument("--seed", type=int, default=1, help="simulator seed")
    s.add_argument("--model", default="cascade",
                   help="cascade (full cascade for every request) or recycle_router (feedback, request_time and "
                        "new_session sent as the main job does; prints the strategy mix)")
    s.add_argument("--json", help="also write the report (JSON) here")
    s.set_defaults(func=cmd_replay)

    s = sub.add_parser("perf", help="perf_analyzer on cascade + floor (options after --; try -- --help)")
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_perf)

    s = sub.add_parser("demo", help="the main job: build models if needed, serve, replay, report")
    s.add_argument("--profile", default="default")
    s.add_argument("--models", help="model set directory (default artifacts/models/PROFILE)")
    s.add_argument("--repository", default=str(DEFAULT_REPOSITORY["cpu"]))
    s.add_argument("--requests", type=int, default=4000, help="requests replayed per path (router, always-full)")
    s.add_argument("--concurrency", type=int, default=16, help="concurrent simulated sessions")
    s.add_argument("--budget", type=float, default=0.01, help="relative effect-loss budget b (0.01 = 1%%)")
    s.add_argument("--max-pages", type=int, default=0, metavar="M",
                   help="depth guard: a cached list serves at most M pages (0 = off, the default; see README, "
                        "'The policy')")
    s.add_argument("--confidence", type=float, default=0.5,
                   help="solve --confidence: the level of the off-policy bound that meets the budget (0.5 = the "
                        "point estimate)")
    s.add_argument("--train-requests", type=int, default=40_000,
                   help="size of the randomised log the estimator is trained on (first run only; cached)")
    s.add_argument("--certify-requests", type=int, default=40_000,
                   help="size of the second randomised log λ is certified on (first run only; cached)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default=str(REPO_ROOT / "runs" / "demo"))
    s.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a, unknown = ap.parse_known_args(argv)
    if unknown:
        if hasattr(a, "rest"):  # perf, build-models: their own options go after `--`
            ap.error(f"unrecognized arguments: {' '.join(unknown)}; the options of `comrecycle {a.command}` go "
                     f"after `--`: comrecycle {a.command} -- {' '.join(unknown + list(a.rest or []))}")
        ap.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(a, "rest", None) and a.rest[:1] == ["--"]:
        a.rest = a.rest[1:]
    t0 = time.time()
    try:
        rc = a.func(a)
    except (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        print(f"comrecycle {a.command}: error: {e}", file=sys.stderr)  # bad input: one line, exit 2
        return 2
    except ComRecycleError as e:  # a part failed (server, cache, tool): its own message, exit 1
        print(f"comrecycle {a.command}: failed: {e}", file=sys.stderr)
        return 1
    # anything else is a bug: it propagates with its traceback
    log.debug("%s took %.1fs", a.command, time.time() - t0)
    return rc


if __name__ == "__main__":
    sys.exit(main())
