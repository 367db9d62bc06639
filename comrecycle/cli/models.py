"""`comrecycle train-estimator | calibrate-estimator | build-models | profile-costs`: the
learned parts (stage models, the effect-loss estimator) and their cost profile."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UserError
from .common import CliError, default_model_dir


# ---- estimator -------------------------------------------------------------------------------------
def cmd_train_estimator(a) -> int:
    from ..estimator.labels import TRUE_Q
    from ..estimator.training import train_and_evaluate

    if not 0 <= a.min_epochs <= a.max_epochs:
        raise CliError(f"--min-epochs must be in 0..--max-epochs ({a.max_epochs}), got {a.min_epochs}")
    if not 0 <= a.average_epochs <= a.max_epochs:
        raise CliError(f"--average-epochs must be in 0..--max-epochs ({a.max_epochs}), got {a.average_epochs}")
    if a.ensemble < 1:
        raise CliError(f"--ensemble must be >= 1 net, got {a.ensemble}")
    if a.install and a.label == TRUE_Q:
        raise CliError("--install with --label true-q: an estimator fitted to a simulator's exact q_j is the feature "
                       "ceiling of the estimator's inputs, for evaluation only, and is not installed for serving")
    try:
        res = train_and_evaluate(a.logs, a.out, eval_logs=a.eval_logs, holdout=a.holdout, seed=a.seed,
                                 max_epochs=a.max_epochs, progress=not a.quiet, baselines=not a.no_baselines,
                                 min_epochs=a.min_epochs, list_origin=not a.no_list_origin, label=a.label,
                                 average_epochs=a.average_epochs, select=a.select, ensemble=a.ensemble)
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
        from ..repository import install_estimator

        dst = install_estimator(a.install, a.out)
        print(f"installed as {dst}")
    return 0


def cmd_calibrate_estimator(a) -> int:
    import shutil

    from ..estimator.effect_loss import EffectLossEstimator
    from ..estimator.training import read_training_logs

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
    from .build import main as build_main

    return build_main(a.rest)


def cmd_profile_costs(a) -> int:
    from ..runtime.cascade import InProcessCascade
    from ..runtime.costs import cost_profile
    from ..sim.world import world_for
    from ..sim import SessionSimulator

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

def add_parsers(sub) -> None:
    """The models commands' parsers."""
    from ..estimator.labels import ESTIMATOR_LABELS, LABELS

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
                        "effect; 8 learns it on the 520k-request logs, docs/history.md, 'More deep data, longer training, a scale')")
    s.add_argument("--average-epochs", type=int, default=0, metavar="N",
                   help="train all --max-epochs and keep the average of the weights of the last N epochs "
                        "(stochastic weight averaging) instead of the best epoch; for noisy labels")
    s.add_argument("--no-list-origin", action="store_true",
                   help="leave out the list-origin feature (the session page each cached list was computed "
                        "for), as estimators trained before it had (docs/history.md, 'Noise or shift: noise-free labels and the list origin')")
    s.add_argument("--label", choices=ESTIMATOR_LABELS, default="clicks",
                   help="what the estimator learns from: the logged clicks, or view-adjusted clicks (the "
                        "scrolling-depth noise removed by a control variate, unbiased under position-based "
                        "examination; needs the n_viewed, page_items and clicked_items columns; "
                        "docs/RESULTS.md, \"View-adjusted labels\"); true-q = a simulator log's exact q_j of "
                        "every strategy, noise-free: not deployable, the feature ceiling of the estimator's "
                        "inputs (docs/evaluation.md#oracle-and-feature-ceiling)")
    s.add_argument("--select", choices=("outcome", "uplift"), default="outcome",
                   help="what early stopping and the choice of epoch watch on the validation sessions: the loss of "
                        "the logged reward (outcome) or minus the summed IPW Qini of ΔQ̂_j (uplift; on the feed "
                        "world it ranked worse, docs/RESULTS.md, 'The estimator's ranking is the bottleneck')")
    s.add_argument("--ensemble", type=int, default=1, metavar="N",
                   help="train N nets with different seeds and serve the mean of their q (and so of their ΔQ) "
                        "as one graph: the ranking varies a lot from seed to seed, the mean ranks better; the "
                        "estimator's compute is N times (docs/RESULTS.md, \"The estimator's training seed, and an ensemble\")")
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
