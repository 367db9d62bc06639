"""`comrecycle closed-loop | closed-loop-frontier`: a policy inside the simulator, where its own
decisions age the cache it reads; the realised loss and saving, and every family's frontier."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..specs import N_RECYCLE
from ..policy.solve import CommandError
from .common import budgets_pct, is_true_q_estimator


def _require_files(paths, flag: str) -> None:
    missing = [str(p) for p in paths or () if not Path(p).is_file()]
    if missing:
        raise CommandError(f"{flag}: no such file(s) {missing}")


def cmd_closed_loop(a) -> int:
    import torch

    from ..policy.closed_loop import LambdaController, closed_loop_metrics, dcaf_from_logs, simulate_policy
    from ..policy.decide import load_params

    torch.set_num_threads(1)  # several closed-loop runs share the cores
    models = Path(a.models)
    if not (models / "manifest.json").exists():
        raise CommandError(f"{models}: not a model set (no manifest.json); build one with build_models.py")
    sim_options = {"continue_prob": a.continue_prob} if a.continue_prob is not None else None
    params = load_params(a.params) if a.params else None
    if a.max_pages is not None:
        if a.max_pages < 1:
            raise CommandError(f"--max-pages must be >= 1, got {a.max_pages}")
        if params is not None:
            params["max_pages"] = a.max_pages
    if a.warmup < 0:
        raise CommandError(f"--warmup must be >= 0 requests, got {a.warmup}")
    if a.budget is not None:
        if params is None or not 0 <= a.budget < 1:
            raise CommandError(f"--budget needs --params and a value in [0, 1), got {a.budget}")
        params["budget"] = a.budget
    if a.random is not None and not 0 <= a.random <= 1:
        raise CommandError(f"--random must be a probability in [0, 1], got {a.random}")
    if a.strategy is None and a.random is None and (
            params is None or not (a.estimator or a.oracle or a.dcaf_logs or a.feature_ceiling_logs)):
        raise CommandError("the policy needs --estimator and --params (or --oracle, --dcaf-logs or "
                           "--feature-ceiling-logs with --params, or --strategy J for a fixed rule)")
    ceiling = None
    if a.feature_ceiling_logs:
        if a.estimator or a.oracle or a.dcaf_logs or a.strategy is not None or a.random is not None or a.explore:
            raise CommandError("--feature-ceiling-logs is its own policy: not with --estimator, --oracle, --dcaf-logs, "
                               "--strategy, --random or --explore")
        if not a.controller:
            raise CommandError("--feature-ceiling-logs needs --controller (λ is tuned on the true loss in the loop)")
        _require_files(a.feature_ceiling_logs, "--feature-ceiling-logs")
        from ..policy.frontier import FeatureCeiling

        ceiling = FeatureCeiling.fit(pa.concat_tables([pq.read_table(p) for p in a.feature_ceiling_logs],
                                                      promote_options="default"), seed=a.seed)
    true_q_ceiling = bool(a.estimator) and is_true_q_estimator(a.estimator)
    if true_q_ceiling:
        # fitted to the true q_j (train-estimator --label true-q): the feature ceiling of the
        # estimator's inputs, run as the summary-feature ceiling is (λ on the true loss)
        if (not a.controller or a.explore or a.strategy is not None or a.random is not None or a.oracle
                or a.dcaf_logs):
            raise CommandError(f"{a.estimator} was trained with --label true-q: it is the feature ceiling of the "
                               f"estimator's inputs, run with --params and --controller (λ tuned on the true loss), "
                               f"not with --explore, --strategy, --random, --oracle or --dcaf-logs")
        from ..estimator.effect_loss import EffectLossEstimator

        ceiling = EffectLossEstimator.load(a.estimator)
    dcaf = None
    if a.dcaf_logs:
        if a.estimator or a.oracle or a.strategy is not None or a.random is not None:
            raise CommandError("--dcaf-logs is its own policy: not with --estimator, --oracle, --strategy or --random")
        _require_files(a.dcaf_logs, "--dcaf-logs")
        try:
            dcaf = dcaf_from_logs(pa.concat_tables([pq.read_table(p) for p in a.dcaf_logs], promote_options="default"))
        except (KeyError, ValueError) as e:
            raise CommandError(f"--dcaf-logs: expected an exploration log of `comrecycle closed-loop --explore` "
                               f"(columns is_repeat, strategy, reward, propensity, cache state): {e}") from None
    controller = None
    if a.controller:
        controller = LambdaController(lam=max(float(params["lambda"]), 0.01), budget=float(params["budget"]))
    costs = (np.asarray(params["costs"]) if params else
             np.array([float(v) for v in json.loads((models / "cost_profile.json").read_text())["strategy_cost"].values()]))
    arms = None
    if a.explore_shadow and not a.explore:
        raise CommandError("--explore-shadow needs --explore EPS (it changes what exploration writes to the cache)")
    if a.explore:
        if not 0 < a.explore <= 1 or a.strategy is not None or a.random is not None or a.oracle:
            raise CommandError(f"--explore is ε in (0, 1] for the estimator policy, got {a.explore}")
        try:
            arms = tuple(sorted({int(x) for x in a.explore_arms.split(",")})) if a.explore_arms else None
        except ValueError:
            raise CommandError(f"--explore-arms: expected strategy ids like 0,3, got {a.explore_arms!r}") from None
        if arms is not None and (not arms or min(arms) < 0 or max(arms) > N_RECYCLE):
            raise CommandError(f"--explore-arms: strategy ids must be in 0..{N_RECYCLE}, got {a.explore_arms!r}")
    fixed = a.strategy is not None or a.random is not None
    # the oracle, DCAF and the feature ceilings are upper bounds or baselines without an estimator call
    est_cost = (float(params.get("estimator_cost", 0.0))
                if params and not fixed and not a.oracle and not dcaf and ceiling is None else 0.0)
    table, policy = simulate_policy(models, a.warmup + a.requests, seed=a.seed,
                                    estimator_dir=None if true_q_ceiling else a.estimator,
                                    params=params, controller=controller, strategy=a.strategy, progress=not a.quiet,
                                    sim_options=sim_options, oracle=a.oracle, max_pages=a.max_pages,
                                    random_p=a.random, explore=a.explore, explore_arms=arms, dcaf=dcaf,
                                    explore_shadow=a.explore_shadow, ceiling=ceiling)
    # the warm-up's requests run the policy (the controller adapts, the caches age) but are not
    # measured; rows are in serving order
    table = table.slice(a.warmup)
    res = closed_loop_metrics(table, costs, est_cost)
    res.update({"policy": f"random p={a.random:g}" if a.random is not None else
                f"strategy {a.strategy}" if a.strategy is not None else
                ("oracle" if a.oracle else "dcaf-cache_pages" if dcaf else
                 "feature ceiling (estimator inputs)" if true_q_ceiling else "feature ceiling" if ceiling else
                 "comrecycle (the router's own decision)" if policy is None else "comrecycle")
                + (" + λ controller" if controller else ", fixed λ"),
                "budget_pct": 100 * float(params["budget"]) if params else None, "seed": a.seed,
                "continue_prob": a.continue_prob, "lambda_start": float(params["lambda"]) if params else None,
                "max_pages": a.max_pages if a.max_pages is not None else (params or {}).get("max_pages"),
                "warmup_requests": a.warmup})
    if dcaf is not None:
        res["dcaf"] = {"mean_loss_ipw": [None if not np.isfinite(v) else float(v) for v in dcaf["mean_loss"]],
                       "mean_pages": dcaf["mean_pages"], "mean_effect": dcaf["mean_effect"], "rows": dcaf["rows"]}
    if policy is not None:
        res["predicted_loss_pct"] = policy.predicted_loss_pct(skip_requests=a.warmup)
    if controller is not None:
        res["lambda_end"] = controller.lam
        res["lambda_trace"] = controller.trace[:: max(1, len(controller.trace) // 50)]
    return _report(res, a, table)


def _report(res: dict, a, table) -> int:
    """Print the result (and a warning when the budget is missed); write it and the log if asked."""
    print(json.dumps({k: v for k, v in res.items() if k != "lambda_trace"}, indent=2))
    warning = budget_warning(res)
    if warning:
        print(warning)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    if a.log_out:
        pq.write_table(table, a.log_out)
    return 0


def budget_warning(res: dict) -> str | None:
    """A line when a closed-loop run's realised loss is above its budget beyond its interval."""
    budget, ci = res.get("budget_pct"), res.get("loss_ci95")
    if budget is None or not ci or "strategy" in str(res.get("policy")) or "random" in str(res.get("policy")):
        return None
    if ci[0] > budget:
        return (f"WARNING: the realised loss {res['effect_loss_pct']:.2f}% [95% CI {ci[0]:.2f}, {ci[1]:.2f}] is above "
                f"the {budget:g}% budget. λ from a log certifies the loss on the logged cache states; a deployed "
                "policy ages its caches. Try `solve --confidence 0.95`, a larger --budget margin, or --controller.")
    return None


def cmd_closed_loop_frontier(a) -> int:
    from ..policy.closed_loop_frontier import closed_loop_frontier

    models = Path(a.models)
    if not (models / "manifest.json").exists():
        raise CommandError(f"{models}: not a model set (no manifest.json); build one with build_models.py")
    if (a.estimator or a.oracle_budgets or a.dcaf_logs or a.feature_ceiling_logs) and not a.params:
        raise CommandError("--estimator, --oracle-budgets, --dcaf-logs and --feature-ceiling-logs need --params "
                           "(c_j, estimator cost, starting λ)")
    if a.estimator and is_true_q_estimator(a.estimator):
        raise CommandError(f"{a.estimator} was trained with --label true-q: it is a feature ceiling, not the "
                           f"ComRecycle family of this frontier; run it with `closed-loop --estimator "
                           f"{a.estimator} --params P --controller --budget B`")
    _require_files(a.dcaf_logs, "--dcaf-logs")
    _require_files(a.feature_ceiling_logs, "--feature-ceiling-logs")
    oracle = budgets_pct(a.oracle_budgets, "--oracle-budgets")
    ceiling = budgets_pct(a.ceiling_budgets, "--ceiling-budgets")
    if a.feature_ceiling_logs and not ceiling:
        raise CommandError("--feature-ceiling-logs needs --ceiling-budgets (e.g. 0.5,1,2)")
    if a.warmup < 0:
        raise CommandError(f"--warmup must be >= 0 requests, got {a.warmup}")
    try:
        closed_loop_frontier(str(models), a.out, a.seeds, estimator=a.estimator, params=a.params,
                             requests=a.requests, workers=a.workers, oracle_budgets_pct=oracle, progress=not a.quiet,
                             dcaf_logs=a.dcaf_logs or (), warmup=a.warmup,
                             ceiling_logs=a.feature_ceiling_logs or (), ceiling_budgets_pct=ceiling)
    except RuntimeError as e:
        raise CommandError(str(e)) from None
    print(Path(a.out, "frontier.md").read_text())
    print(f"wrote {a.out}/frontier.md, frontier.csv, frontier.json, frontier.png")
    return 0


def add_parsers(sub) -> None:

    s = sub.add_parser("closed-loop", help="run the policy (or a fixed strategy) inside the simulator: "
                                           "realised loss and compute saved on live cache states")
    s.add_argument("--models", required=True, help="model set directory (artifacts/models/default)")
    s.add_argument("--estimator", help="estimator directory")
    s.add_argument("--params", help="params JSON from comrecycle solve (λ, c_j, budget)")
    s.add_argument("--strategy", type=int, choices=range(N_RECYCLE + 1), help="a fixed rule instead of the policy")
    s.add_argument("--controller", action="store_true", help="near-line λ: keep the predicted loss at the budget")
    s.add_argument("--oracle", action="store_true", help="decide with the true ΔQ (runs every strategy per request)")
    s.add_argument("--dcaf-logs", nargs="+", metavar="LOG",
                   help="DCAF-style baseline: ΔQ from a hand-picked feature (pages served from the cache) scaled by "
                        "each strategy's IPW mean loss in these exploration logs (Parquet), same solver and controller")
    s.add_argument("--feature-ceiling-logs", nargs="+", metavar="LOG",
                   help="the feature ceiling: regressors of the true ΔQ_j fitted on these randomised logs with q_j "
                        "(comrecycle simulate --logging random), from the features a router sees; with --params "
                        "and --controller, which here holds the *true* loss at the budget (evaluation only)")
    s.add_argument("--random", type=float, metavar="P", help="random recycling baseline: recycle a repeated "
                                                               "request with probability P by a random strategy")
    s.add_argument("--budget", type=float, help="override the params' loss budget b (0.01 = 1%%)")
    s.add_argument("--explore", type=float, default=0.0, metavar="EPS",
                   help="serve a random available strategy with probability EPS (propensities logged): "
                        "an on-policy log for calibrate-estimator")
    s.add_argument("--explore-arms", help="strategies exploration draws from (comma separated; default all)")
    s.add_argument("--explore-shadow", action="store_true",
                   help="an explored strategy is served, but the cache keeps what the policy's choice would have "
                        "left (for an explored recycle, the lists of the policy's refresh, computed in the "
                        "shadow): the log's cache states stay those of the policy (for solve and "
                        "calibrate-estimator on the deployed rule's own states)")
    s.add_argument("--requests", type=int, default=20_000, help="measured requests (after --warmup)")
    s.add_argument("--warmup", type=int, default=0, metavar="N",
                   help="first serve N requests that are not measured: the λ controller settles and the caches "
                        "age under the policy, as in a deployment that carries λ over")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--continue-prob", type=float, help="shifted traffic: probability a session continues")
    s.add_argument("--max-pages", type=int, default=None, metavar="M",
                   help="depth guard: a cached list that has served M pages is not recycled again "
                        "(overrides the params' max_pages; also applies to --strategy)")
    s.add_argument("--out", help="metrics JSON")
    s.add_argument("--log-out", help="also write the closed-loop log (Parquet)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_closed_loop)

    s = sub.add_parser("closed-loop-frontier",
                       help="closed-loop runs of every policy family over their knob and several seeds: "
                            "table, CSV and PNG of compute saved vs realised loss")
    s.add_argument("--models", required=True, help="model set directory (artifacts/models/default)")
    s.add_argument("--estimator", help="estimator directory (adds ComRecycle at each budget)")
    s.add_argument("--params", help="params JSON from comrecycle solve (c_j, estimator cost, starting λ)")
    s.add_argument("--seeds", type=int, nargs="+", default=[5, 7])
    s.add_argument("--requests", type=int, default=12_000, help="requests per run")
    s.add_argument("--workers", type=int, default=2, help="runs at a time (one core each)")
    s.add_argument("--warmup", type=int, default=0, metavar="N",
                   help="every run first serves N unmeasured requests (closed-loop --warmup), so that the "
                        "controllers start from a settled λ as a deployment would; runs are kept per N")
    s.add_argument("--oracle-budgets", help="budgets in %% for the oracle (comma separated; ~15 min per run)")
    s.add_argument("--feature-ceiling-logs", nargs="+", metavar="LOG",
                   help="randomised logs with q_j (comrecycle simulate --logging random): adds the feature ceiling, "
                        "regressors of the true ΔQ_j from the features a router sees, λ held on the true loss")
    s.add_argument("--ceiling-budgets", help="budgets in %% for the feature ceiling (comma separated)")
    s.add_argument("--dcaf-logs", nargs="+", metavar="LOG",
                   help="exploration logs (closed-loop --explore --log-out): adds the DCAF-style family at each budget")
    s.add_argument("--out", required=True, help="output directory (runs/ is kept: re-running resumes)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_closed_loop_frontier)
