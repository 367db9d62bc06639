"""`comrecycle solve | decide | evaluate | frontier | closed-loop | closed-loop-frontier | policy-check`
(docs/contracts.md): thin over comrecycle.policy, printing what it finds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..specs import N_RECYCLE
from ..policy.solve import CommandError, SolveOptions, load_estimator_dir, read_policy_log, resolve_costs, solve_files


def cmd_solve(a) -> int:
    opts = SolveOptions(budget=a.budget, confidence=a.confidence, omega=a.omega, choice=a.choice,
                        max_pages=a.max_pages, credit_gains=not a.no_credit_gains, loss_estimate=a.loss_estimate,
                        label=a.label, allow_in_sample=a.allow_in_sample, loss_floor=not a.no_loss_floor,
                        strategies=a.strategies, grid=a.grid, estimator_cost=not a.no_estimator_cost)
    res = solve_files(a.logs, a.estimator, opts, cost_profile=a.cost_profile, costs_from_logs=a.costs_from_logs,
                      default_cost_profile=a.default_cost_profile, out=a.out)
    params, cert, log, out = res.params, res.cert, res.log, Path(a.out)
    print("c = " + ", ".join(f"{c:.3f}" for c in res.costs) + f" ({res.costs_source}); {res.estimator_note}")
    pr = params["predicted"]
    print(f"λ = {params['lambda']:.6g} for budget b = {a.budget:.4%} ({params['form']})")
    if cert is None:
        print(f"on {log.num_rows:,} logged requests (the estimator's own prediction): effect loss "
              f"{pr['effect_loss_pct']:.3f}%, compute saved {pr['compute_saved_pct']:.2f}%, mix of repeated: " +
              ", ".join(f"{j}: {v:.1%}" for j, v in pr["strategy_mix"].items()))
        warning = prediction_warning(pr["effect_loss_pct"], a.budget)
        if warning:
            print(warning)
    else:
        c = params["certification"]
        lvl = ("95% interval" if a.confidence == 0.5 else
               f"{2 * a.confidence - 1:.0%} interval, its upper end the {a.confidence:.0%} bound")
        print(f"deployed rule on {cert.requests:,} held-out logged requests ({cert.sessions:,} sessions; DR, {c['label']} "
              f"reward): effect loss {cert.loss_pct:.3f}% [{lvl}: {cert.ci_pct[0]:.3f}, {cert.ci_pct[1]:.3f}], "
              f"compute saved {cert.saved_pct:.2f}%, mix of repeated: " +
              ", ".join(f"{j}: {v:.1%}" for j, v in cert.strategy_mix.items()))
        print(f"the estimator itself predicts {c['estimator_predicted_loss_pct']:.3f}% for this rule")
        warning = prediction_warning(c["estimator_predicted_loss_pct"], a.budget, dr_loss_pct=cert.loss_pct)
        if warning:
            print(warning)
        if len(c["families"]) > 1:
            print("families certified: " + "; ".join(
                f"strategies {','.join(map(str, f['strategies']))}: λ = {f['lambda']:.4g}, loss {f['loss_pct']:.3f}%, "
                f"saved {f['saved_pct']:.2f}%" for f in c["families"]) + " -> deployed: strategies " +
                ",".join(map(str, params["strategies"] or range(N_RECYCLE + 1))))
        if not cert.certified:
            print(f"WARNING: no λ certifies b = {a.budget:.3%} at confidence {a.confidence:g} on this log, even the "
                  "most conservative rule (written). The estimator predicts gains of recycling that the log does not "
                  "confirm; solve again without --no-loss-floor.")
        elif 100 * a.budget < cert.floor_pct:
            gamma = 0.95 if a.confidence == 0.5 else a.confidence
            floor = (f"{cert.floor_pct:.3f}%" if np.isfinite(cert.floor_pct)
                     else "none: no rule's loss stands out of the noise")
            rec = cert.curve.recycled[np.searchsorted(cert.curve.lam, cert.lam)]
            print(f"WARNING: b = {a.budget:.3%} is below this log's noise floor at confidence {gamma:g} ({floor}): "
                  f"the interval of any rule that recycles enough to show a loss is wider than the budget, so the "
                  f"chosen λ rests on noise (it recycles {rec:.1%} of repeated requests). Use a larger held-out log "
                  "(the interval narrows as 1/√requests; uniform logging gives narrower ones than skewed), a "
                  "larger --budget, or a lower --confidence.")
    print(f"wrote {out}")
    return 0


def prediction_warning(predicted_loss_pct: float, budget: float, dr_loss_pct: float | None = None) -> str | None:
    """A line when the estimator predicts that recycling *gains* more effect than the budget allows
    to lose: skipping stages rarely improves a page, so such a prediction is optimism, not news."""
    if not predicted_loss_pct < -100 * budget:
        return None
    if dr_loss_pct is None:
        return (f"WARNING: the estimator predicts an effect loss of {predicted_loss_pct:.3f}% (a gain) for the "
                f"chosen rule, and with --loss-estimate predicted the {100 * budget:g}% budget is checked against "
                "that prediction, so it does not bound the realised loss. Solve with --loss-estimate dr on a "
                "held-out randomised log, or with --no-credit-gains.")
    return (f"WARNING: the estimator predicts an effect loss of {predicted_loss_pct:.3f}% (a gain) for this rule "
            f"while the off-policy estimate is {dr_loss_pct:.3f}%: it is optimistic about recycling on some "
            "requests. λ rests on the off-policy estimate, not on this prediction; for a better ranking, "
            "calibrate it (`comrecycle calibrate-estimator` on a held-out randomised log) or solve with "
            "--no-credit-gains.")


def cmd_decide(a) -> int:
    from ..policy.decide import available_from_log, decide, load_params, policy_dq, predict

    log = read_policy_log(a.logs)
    est = load_estimator_dir(a.estimator)
    params = load_params(a.params)
    _, dq = predict(log, est)
    dq = policy_dq(dq, params)
    avail = available_from_log(log, params.get("max_pages"))
    s = decide(dq, avail, params, seed=a.seed)
    s[~log["is_repeat"].to_numpy()] = 0
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"request_id": log["request_id"], "strategy": pa.array(s, pa.int8())}), out)
    rep = log["is_repeat"].to_numpy()

    def mix(x):
        return ", ".join(f"{j}: {m:.1%}" for j, m in enumerate(np.bincount(x, minlength=N_RECYCLE + 1) /
                                                               max(1, len(x))))

    print(f"{len(s):,} decisions -> {out}; strategy mix of all {len(s):,} requests: {mix(s)}; "
          f"of the {int(rep.sum()):,} repeated: {mix(s[rep])}")
    return 0


def cmd_evaluate(a) -> int:
    from ..policy.ope import align_decisions, evaluate, report_markdown

    log = read_policy_log(a.logs)
    if not Path(a.decisions).exists():
        raise CommandError(f"decisions file {a.decisions} does not exist; write one with `comrecycle decide`")
    decisions = pq.read_table(a.decisions)
    pi = align_decisions(log, decisions)
    params = None
    if a.params:
        from ..policy.decide import load_params
        params = load_params(a.params)
    if params is not None:
        costs, est_cost = np.asarray(params["costs"]), float(params.get("estimator_cost", 0.0))
    else:
        costs, _, _ = resolve_costs(log, a.cost_profile, a.costs_from_logs, a.default_cost_profile)
        est_cost = 0.0
    q_hat = None
    if a.estimator:
        from ..policy.decide import predict
        q_hat, _ = predict(log, load_estimator_dir(a.estimator))
    res = evaluate(log, pi, costs, q_hat=q_hat, estimator_cost=est_cost, n_boot=a.bootstrap, seed=a.seed,
                   label=a.label)
    text = report_markdown(res)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
        Path(a.out).with_suffix(".md").write_text(text)
    return 0


def cmd_frontier(a) -> int:
    from ..policy.decide import predict
    from ..policy.frontier import frontier, write_frontier

    log = read_policy_log(a.logs)
    q_hat = dq = None
    est_cost = 0.0
    if a.params:
        from ..policy.decide import load_params
        p = load_params(a.params)
        costs, est_cost = np.asarray(p["costs"]), float(p.get("estimator_cost", 0.0))
    else:
        costs, _, _ = resolve_costs(log, a.cost_profile, a.costs_from_logs, a.default_cost_profile)
    if a.estimator:
        q_hat, dq = predict(log, load_estimator_dir(a.estimator))
    budgets = _budgets_pct(a.budgets)
    ceiling = read_policy_log(a.feature_ceiling_logs) if a.feature_ceiling_logs else None
    res = frontier(log, costs, q_hat, dq, estimator_cost=est_cost, budgets=budgets, seed=a.seed,
                   ceiling_log=ceiling)
    res["log"] = str(a.logs)
    files = write_frontier(res, a.out)
    print(files["md"].read_text())
    print("wrote " + ", ".join(str(f) for f in files.values()))
    return 0


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
    if a.strategy is None and a.random is None and (params is None or not (a.estimator or a.oracle or a.dcaf_logs)):
        raise CommandError("the policy needs --estimator and --params (or --oracle or --dcaf-logs with --params, "
                           "or --strategy J for a fixed rule)")
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
    est_cost = float(params.get("estimator_cost", 0.0)) if params and not fixed and not a.oracle and not dcaf else 0.0
    table, policy = simulate_policy(models, a.warmup + a.requests, seed=a.seed, estimator_dir=a.estimator,
                                    params=params, controller=controller, strategy=a.strategy, progress=not a.quiet,
                                    sim_options=sim_options, oracle=a.oracle, max_pages=a.max_pages,
                                    random_p=a.random, explore=a.explore, explore_arms=arms, dcaf=dcaf,
                                    explore_shadow=a.explore_shadow)
    # the warm-up's requests run the policy (the controller adapts, the caches age) but are not
    # measured; rows are in serving order
    table = table.slice(a.warmup)
    res = closed_loop_metrics(table, costs, est_cost)
    res.update({"policy": f"random p={a.random:g}" if a.random is not None else
                f"strategy {a.strategy}" if a.strategy is not None else
                ("oracle" if a.oracle else "dcaf-cache_pages" if dcaf else "comrecycle")
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
    if (a.estimator or a.oracle_budgets or a.dcaf_logs) and not a.params:
        raise CommandError("--estimator, --oracle-budgets and --dcaf-logs need --params (c_j, estimator cost, starting λ)")
    _require_files(a.dcaf_logs, "--dcaf-logs")
    oracle = [float(x) for x in a.oracle_budgets.split(",")] if a.oracle_budgets else []
    if a.warmup < 0:
        raise CommandError(f"--warmup must be >= 0 requests, got {a.warmup}")
    try:
        closed_loop_frontier(str(models), a.out, a.seeds, estimator=a.estimator, params=a.params,
                             requests=a.requests, workers=a.workers, oracle_budgets_pct=oracle, progress=not a.quiet,
                             dcaf_logs=a.dcaf_logs or (), warmup=a.warmup)
    except RuntimeError as e:
        raise CommandError(str(e)) from None
    print(Path(a.out, "frontier.md").read_text())
    print(f"wrote {a.out}/frontier.md, frontier.csv, frontier.json, frontier.png")
    return 0


def cmd_policy_check(a) -> int:
    from ..policy.certify import z_of
    from ..policy.pipeline import check_markdown, comparison_markdown, feed_world_check

    z_of(a.confidence)
    budgets = _budgets_pct(a.budgets)
    if a.requests < 1000:
        raise CommandError(f"--requests: expected at least 1000 requests per log, got {a.requests}")
    rows, comparisons = feed_world_check(a.requests, a.seeds, budgets, confidence=a.confidence,
                                         train_requests=a.train_requests, max_epochs=a.max_epochs,
                                         progress=not a.quiet, compare=a.compare)
    text = check_markdown(rows, f"The learned policy on the feed world ({a.requests:,}-request logs, confidence "
                                f"{a.confidence:g})") + comparison_markdown(comparisons, budgets)
    print(text)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "check.md").write_text(text)
        (out / "check.json").write_text(json.dumps({"runs": rows, "rankings": comparisons}, indent=2,
                                                   default=float) + "\n")
        print(f"wrote {out}/check.md, check.json")
    return 0


def _budgets_pct(text: str) -> list[float]:
    try:
        budgets = [float(b) / 100.0 for b in text.split(",")]
    except ValueError:
        raise CommandError(f"--budgets: expected comma-separated percentages such as 0.5,1,2, got {text!r}") from None
    bad = [100 * b for b in budgets if not 0 <= b < 1]
    if bad:
        raise CommandError(f"--budgets: expected percentages in [0, 100), got {bad}")
    return budgets


def add_parsers(sub, default_cost_profile: str) -> None:
    from ..estimator.labels import LABELS

    s = sub.add_parser("solve", help="λ for a loss budget on a log with the estimator -> params JSON")
    s.add_argument("--logs", required=True, help="request log (Parquet, docs/contracts.md#request-log-schema)")
    s.add_argument("--estimator", required=True, help="estimator directory (comrecycle train-estimator --out)")
    s.add_argument("--budget", type=float, default=0.01, help="allowed relative effect loss b (0.01 = 1%%)")
    s.add_argument("--omega", type=float, default=0.0, help="ω > 0: the regularised (soft) form")
    s.add_argument("--choice", choices=("argmax", "sample"), default="argmax", help="ω > 0: how x_i picks")
    s.add_argument("--cost-profile", help="measured cost profile JSON (default: the log's own `cost` column when "
                                          "every strategy appears in it, else the default model set's profile)")
    s.add_argument("--costs-from-logs", action="store_true", help="c_j = mean `cost` per strategy in the log")
    s.add_argument("--no-estimator-cost", action="store_true", help="do not time the estimator")
    s.add_argument("--loss-estimate", choices=("dr", "predicted"), default="dr",
                   help="what the budget is checked against: dr (default) = a doubly robust off-policy estimate of "
                        "the deployed rule's loss on this log, which must be held out from the estimator's training; "
                        "predicted = the estimator's own predicted loss")
    s.add_argument("--confidence", type=float, default=0.5, metavar="GAMMA",
                   help="with dr: the one-sided upper confidence bound at this level meets the budget (0.95 = a 95%% "
                        "bound; 0.5, the default = the point estimate). Warns when the budget is below the log's "
                        "noise floor (printed)")
    s.add_argument("--no-loss-floor", action="store_true",
                   help="with dr: let predicted gains of recycling count (by default every recycled request is "
                        "counted with a loss of at least 0.1%% of a repeated request's predicted effect, so a large "
                        "λ serves everything in full)")
    s.add_argument("--label", choices=("auto",) + tuple(LABELS), default="auto",
                   help="reward of the dr estimate: auto = view-adjusted clicks when the log has the exposure columns "
                        "(same expectation, less noise), else the logged clicks")
    s.add_argument("--grid", type=int, default=256, help="λ values the deployed rule is evaluated at")
    s.add_argument("--strategies", metavar="IDS",
                   help="with dr: the strategies the rule may use, e.g. 0,3 (default: certify both every strategy "
                        "and 'full or the cheapest', deploy the one that saves more)")
    s.add_argument("--allow-in-sample", action="store_true",
                   help="certify even on rows the estimator was trained on (biased: for experiments only)")
    s.add_argument("--max-pages", type=int, default=None, metavar="M",
                   help="depth guard: a cached list that has served M pages is not recycled again "
                        "(a safety net for the loss of deep caches the estimator does not see)")
    s.add_argument("--no-credit-gains", action="store_true",
                   help="count max(ΔQ̂, 0) against the budget: predicted gains of recycling are not banked, so an "
                        "optimistic estimator on young caches cannot cancel the loss of deep ones (written into "
                        "the params: the router and closed-loop do the same)")
    s.add_argument("--out", required=True, help="params JSON to write")
    s.set_defaults(func=cmd_solve, default_cost_profile=default_cost_profile)

    s = sub.add_parser("policy-check", help="the whole pipeline (train-estimator → solve → decide) on the feed world, "
                                            "a second generator, scored against its ground truth, per seed and budget")
    s.add_argument("--requests", type=int, default=60_000, help="requests per solving and test log")
    s.add_argument("--train-requests", type=int, help="requests of the training log (default --requests)")
    s.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    s.add_argument("--budgets", default="0.5,1,2", help="loss budgets in %% (comma separated)")
    s.add_argument("--confidence", type=float, default=0.95, help="solve --confidence")
    s.add_argument("--max-epochs", type=int, default=15, help="estimator epochs (early stopping may stop sooner)")
    s.add_argument("--compare", action="store_true",
                   help="also compare rankings at equal true loss: the estimator, a T-learner, a DR-learner, the "
                        "feature ceiling, DCAF by one feature, the best static rule and the oracle")
    s.add_argument("--out", help="directory for check.md and check.json")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_policy_check)

    s = sub.add_parser("decide", help="one strategy per logged request (0 for initial ones)")
    s.add_argument("--logs", required=True)
    s.add_argument("--estimator", required=True)
    s.add_argument("--params", required=True, help="params JSON from comrecycle solve")
    s.add_argument("--seed", type=int, default=0, help="for choice = sample")
    s.add_argument("--out", required=True, help="decisions Parquet (request_id, strategy)")
    s.set_defaults(func=cmd_decide)

    s = sub.add_parser("evaluate", help="off-policy estimate of compute saved and effect loss of decisions")
    s.add_argument("--logs", required=True, help="randomised log (propensities; q_j make it exact)")
    s.add_argument("--decisions", required=True)
    s.add_argument("--params", help="params JSON (its c_j and estimator cost); else --cost-profile")
    s.add_argument("--estimator", help="estimator directory: adds the doubly-robust estimate")
    s.add_argument("--cost-profile", help="default: the log's own `cost` column, else the default model set's profile")
    s.add_argument("--costs-from-logs", action="store_true")
    s.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples over sessions")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--label", choices=LABELS, default="clicks",
                   help="reward of the IPW/DR estimates: the logged clicks, or view-adjusted clicks (same "
                        "expectation, the scrolling-depth noise removed; needs n_viewed, page_items, "
                        "clicked_items)")
    s.add_argument("--out", help="JSON report (and .md next to it)")
    s.set_defaults(func=cmd_evaluate, default_cost_profile=default_cost_profile)

    s = sub.add_parser("frontier", help="compute saved vs effect loss of every policy (table + PNG)")
    s.add_argument("--logs", required=True, help="randomised log with q_0..q_3 (comrecycle simulate --logging random)")
    s.add_argument("--estimator", help="estimator directory (adds the ComRecycle curve)")
    s.add_argument("--params", help="params JSON: its c_j and estimator cost (else --cost-profile)")
    s.add_argument("--cost-profile", help="default: the log's own `cost` column, else the default model set's profile")
    s.add_argument("--costs-from-logs", action="store_true")
    s.add_argument("--budgets", default="0.25,0.5,1,2,5", help="loss budgets in %% (comma separated)")
    s.add_argument("--feature-ceiling-logs", metavar="LOG",
                   help="a separate randomised log of the same world (with q_j): adds the feature ceiling, "
                        "regressors of the true ΔQ_j fitted on it from the observable features")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", required=True, help="output directory (frontier.md/.csv/.png/.json)")
    s.set_defaults(func=cmd_frontier, default_cost_profile=default_cost_profile)

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
    s.add_argument("--random", type=float, metavar="P", help="random recycling baseline: recycle a repeated "
                                                               "request with probability P by a random strategy")
    s.add_argument("--budget", type=float, help="override the params' loss budget b (0.01 = 1%%)")
    s.add_argument("--explore", type=float, default=0.0, metavar="EPS",
                   help="serve a random available strategy with probability EPS (propensities logged): "
                        "an on-policy log for calibrate-estimator")
    s.add_argument("--explore-arms", help="strategies exploration draws from (comma separated; default all)")
    s.add_argument("--explore-shadow", action="store_true",
                   help="an explored refresh (a strategy that recomputes more stages than the policy's choice) is "
                        "served, but the cache keeps what the policy's choice would have left: the log's cache "
                        "states stay those of the policy (for calibrate-estimator)")
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
    s.add_argument("--dcaf-logs", nargs="+", metavar="LOG",
                   help="exploration logs (closed-loop --explore --log-out): adds the DCAF-style family at each budget")
    s.add_argument("--out", required=True, help="output directory (runs/ is kept: re-running resumes)")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(func=cmd_closed_loop_frontier)
