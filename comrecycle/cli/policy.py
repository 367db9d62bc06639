"""`comrecycle solve | decide | evaluate | frontier | policy-check`
(docs/contracts.md): thin over comrecycle.policy, printing what it finds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..specs import N_RECYCLE
from ..policy.solve import CommandError, SolveOptions, load_estimator_dir, read_policy_log, resolve_costs, solve_files
from ..policy.certify import interval_label


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
        lvl = interval_label(a.confidence)
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
                  "(the interval narrows as 1/√requests, and with logging that draws the rule's strategies "
                  "often: `simulate --arm-weights 0.45,0.05,0.05,0.45` for full or strategy 3), a "
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


def cmd_policy_check(a) -> int:
    from ..policy.certify import z_of
    from ..policy.pipeline import check_markdown, comparison_markdown, feed_world_check

    z_of(a.confidence)
    budgets = _budgets_pct(a.budgets)
    if a.requests < 1000:
        raise CommandError(f"--requests: expected at least 1000 requests per log, got {a.requests}")
    if a.ensemble < 1:
        raise CommandError(f"--ensemble: expected a number of nets >= 1, got {a.ensemble}")
    rows, comparisons = feed_world_check(a.requests, a.seeds, budgets, confidence=a.confidence,
                                         train_requests=a.train_requests, max_epochs=a.max_epochs,
                                         progress=not a.quiet, compare=a.compare, ensemble=a.ensemble)
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
    """--budgets as fractions (0.01 = 1%)."""
    from .common import budgets_pct

    return [b / 100.0 for b in budgets_pct(text)]


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
    s.add_argument("--ensemble", type=int, default=1, metavar="N",
                   help="nets of the estimator (train-estimator --ensemble): the mean of N seeds' ΔQ̂")
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
