"""`comrecycle solve` as a library: λ for a loss budget on a held-out randomised log, certified
off-policy (docs/method.md#the-policy), written as router params.

    params, cert = solve(log, estimator, estimator_dir, costs, ..., budget=0.01, confidence=0.95)

Used by the CLI (`comrecycle solve`, which prints the result) and by the main job's router set-up
(policy.deploy). Errors are UserErrors (CommandError) that name the option and what arrived.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import UserError
from ..estimator.labels import TRUE_Q
from ..specs import N_RECYCLE
from .certify import LOSS_FLOOR_SHARE
from .decide import costs_in_log


class CommandError(UserError):
    """Options or files a command cannot use."""


def read_policy_log(path) -> pa.Table:
    from ..sim.logs import read_log

    try:
        return read_log(path)
    except (OSError, pa.ArrowInvalid) as e:
        raise CommandError(f"{path}: cannot read as Parquet ({e})") from None


def load_estimator_dir(est_dir):
    from ..estimator.effect_loss import EffectLossEstimator

    d = Path(est_dir)
    for f in ("manifest.json", "estimator.pt", "estimator.onnx", "item_vocab.npy"):
        if not (d / f).exists():
            raise CommandError(f"estimator directory {d}: missing {f}; expected the output of "
                               f"`comrecycle train-estimator --out {d}`")
    est = EffectLossEstimator.load(d)
    if est.label == TRUE_Q:
        print(f"note: {d} was trained with --label true-q on a simulator log's exact q_j: it is the feature "
              f"ceiling of the estimator's inputs (its curves and savings are that ceiling), not a policy that "
              f"real traffic, which has no q_j, could train", file=sys.stderr)
    return est


def resolve_costs(log: pa.Table, cost_profile: str | None, from_logs: bool,
                  default_profile: str | None = None) -> tuple[np.ndarray, str, dict | None]:
    """c_j, where they come from (said in every report), and the cost profile if one was used.

    Order: an explicit --cost-profile; --costs-from-logs; the log's own `cost` column when every
    strategy appears in it (a log from another system carries its own costs); the default
    profile of the default model set."""
    if from_logs and cost_profile:
        raise CommandError("--cost-profile and --costs-from-logs: pass one of them")
    if from_logs or not cost_profile:
        costs, why = costs_in_log(log)
        if costs is not None:
            return costs, "mean `cost` per strategy in the log (normalised to c_0 = 1)", None
        if from_logs:
            raise CommandError(f"--costs-from-logs: {why}")
        if not default_profile or not Path(default_profile).exists():
            raise CommandError(f"no strategy costs: {why}, and no cost profile "
                               f"{'at ' + str(default_profile) if default_profile else 'given'}; pass "
                               f"--cost-profile (from `comrecycle profile-costs`) or a log with a `cost` column")
        cost_profile = default_profile
    p = Path(cost_profile)
    if not p.exists():
        raise CommandError(f"cost profile {p} does not exist; run `comrecycle profile-costs` "
                           f"or pass --costs-from-logs")
    try:
        prof = json.loads(p.read_text())
        sc = prof["strategy_cost"]
        costs = np.array([float(sc[str(j)]) for j in range(N_RECYCLE + 1)])
    except (KeyError, ValueError, TypeError) as e:
        raise CommandError(f"{p}: expected JSON with strategy_cost for strategies 0..{N_RECYCLE} ({e})") from None
    return costs, f"measured cost profile {p}", prof


def strategy_list(text: str) -> list[int]:
    try:
        ids = sorted({int(x) for x in text.split(",")} | {0})
    except ValueError:
        raise CommandError(f"--strategies: expected comma-separated strategy ids such as 0,3, got {text!r}") from None
    if ids[0] < 0 or ids[-1] > N_RECYCLE or len(ids) < 2:
        raise CommandError(f"--strategies: expected ids in 0..{N_RECYCLE} with at least one recycling strategy, "
                           f"got {text!r}")
    return ids


def dr_label(log: pa.Table, label: str) -> str:
    from ..estimator.labels import EXPOSURE_COLUMNS

    if label != "auto":
        return label
    return "view-adjusted" if all(c in log.column_names for c in EXPOSURE_COLUMNS) else "clicks"


@dataclass
class SolveOptions:
    """The options of `comrecycle solve` (see its --help)."""
    budget: float = 0.01
    confidence: float = 0.5
    omega: float = 0.0
    choice: str = "argmax"
    max_pages: int | None = None
    credit_gains: bool = True
    loss_estimate: str = "dr"
    label: str = "auto"
    allow_in_sample: bool = False
    loss_floor: bool = True
    strategies: str | None = None
    grid: int = 256
    estimator_cost: bool = True

    def check(self) -> None:
        """Refuse values that cannot work before any work is done."""
        from .certify import z_of

        if not 0 <= self.budget < 1:
            raise CommandError(f"--budget: expected a relative effect loss in [0, 1) (0.01 = 1%), got {self.budget:g}")
        z_of(self.confidence)  # refuses a level outside [0.5, 1)
        if self.strategies:
            strategy_list(self.strategies)
        if self.max_pages is not None and self.max_pages < 1:
            raise CommandError(f"--max-pages must be >= 1, got {self.max_pages}")


@dataclass
class SolveResult:
    params: dict
    cert: object | None  # policy.certify.Certification when loss_estimate == "dr"
    log: pa.Table
    costs: np.ndarray
    costs_source: str
    estimator_note: str
    extra: dict = field(default_factory=dict)


def solve_files(logs: str | Path, estimator: str | Path, opts: SolveOptions, *, cost_profile: str | None = None,
                costs_from_logs: bool = False, default_cost_profile: str | None = None,
                out: str | Path | None = None) -> SolveResult:
    """Read the log and the estimator, resolve c_j, solve (and certify) λ, write the params to `out`."""
    from ..estimator.log_features import features_from_log
    from ..estimator.labels import training_labels
    from ..runtime.costs import measure_estimator_seconds
    from ..sim.logs import in_sample_share
    from .certify import certify_families
    from .decide import available_from_log, decide, estimator_version, policy_dq, predict, solve_params, total_effect

    opts.check()
    log = read_policy_log(logs)
    est = load_estimator_dir(estimator)
    costs, source, prof = resolve_costs(log, cost_profile, costs_from_logs, default_cost_profile)
    est_cost = 0.0
    if prof is not None and opts.estimator_cost:
        secs = measure_estimator_seconds(Path(estimator) / "estimator.onnx",
                                         features_from_log(log.slice(0, 64)), batch_size=prof.get("batch_size", 8))
        est_cost = secs / sum(prof["seconds_per_request"].values())
    est_note = (f"estimator cost {est_cost:.4f} per repeated request" if prof is not None else
                "estimator cost not counted (it is timed against a cost profile: pass --cost-profile)")
    q_hat, dq = predict(log, est, repeated_only=True)
    params = solve_params(log, q_hat, dq, costs, opts.budget, omega=opts.omega, choice=opts.choice,
                          estimator_cost=est_cost, max_pages=opts.max_pages, credit_gains=opts.credit_gains)
    params.update({"costs_source": source, "estimator": estimator_version(estimator),
                   "solved_on": {"log": str(logs), "requests": log.num_rows}})
    cert = None
    if opts.loss_estimate == "dr":
        share = in_sample_share(log, getattr(est, "training_rows_", []))
        if share > 0.01 and not opts.allow_in_sample:
            raise CommandError(f"{logs}: {share:.0%} of the rows the estimator was trained on are in this log; "
                               "an off-policy check on them is biased towards the estimator. Solve on a held-out "
                               "randomised log (other sessions or another day), or pass --allow-in-sample")
        label = dr_label(log, opts.label)
        try:
            r = training_labels(log, label)[0]
        except UserError as e:
            raise CommandError(str(e)) from None
        rep = log["is_repeat"].to_numpy()
        if opts.loss_floor:  # no recycling counted as free: the λ family ends at "always full"
            params["loss_floor"] = float(LOSS_FLOOR_SHARE * max(q_hat[rep, 0].mean(), 1e-9))
        rule = dict(params)
        avail = available_from_log(log, opts.max_pages)
        fam, cert, tried = certify_families(
            costs, policy_dq(dq, rule), avail, q_hat, log["strategy"].to_numpy(), log["propensity"].to_numpy(), r,
            log["session_id"].to_numpy(), log["is_repeat"].to_numpy(), opts.budget,
            families=[strategy_list(opts.strategies)] if opts.strategies else None, confidence=opts.confidence,
            omega=opts.omega, choice=opts.choice, estimator_cost=est_cost, grid=opts.grid)
        rule["lambda"] = cert.lam
        params["lambda"] = cert.lam
        params["strategies"] = fam
        rule["strategies"] = fam
        params["certification"] = dict(cert.as_dict(), label=label, in_sample_share=share,
                                       estimator_predicted_loss_pct=None,
                                       families=[{"strategies": f or list(range(N_RECYCLE + 1)), "lambda": c.lam,
                                                  "certified": c.certified, "loss_pct": c.loss_pct,
                                                  "bound_pct": c.bound_pct, "saved_pct": c.saved_pct}
                                                 for f, c in tried])
        # what the estimator itself predicts for the certified rule (how optimistic it is)
        s = decide(policy_dq(dq, rule), avail, rule)
        s[~rep] = 0
        q0 = total_effect(log, q_hat)
        params["certification"]["estimator_predicted_loss_pct"] = float(
            100 * dq[np.arange(len(s)), s].sum() / q0.sum())
        params["predicted"] = {"effect_loss_pct": cert.loss_pct, "compute_saved_pct": cert.saved_pct,
                               "strategy_mix": cert.strategy_mix, "how": "doubly robust off-policy estimate"}
        params["form"] += f", λ certified off-policy (DR, confidence {opts.confidence:g})"
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(params, indent=2) + "\n")
    return SolveResult(params, cert, log, costs, source, est_note)
