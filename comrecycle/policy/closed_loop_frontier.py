"""The closed-loop frontier: compute saved vs realised effect loss of every policy family, each
run inside the simulator on its own cache states (where a log evaluation cannot see how deep
a policy's own recycling lets the caches age), over several seeds.

Families and their knob:
  static-3 (guard M)   strategy 3 whenever usable, a cached list serves at most M pages
  random (p)           recycle with probability p, a random usable strategy (guard off)
  comrecycle (b)       the estimator + the λ controller holding the predicted loss at budget b
  oracle (b)           true ΔQ, the same controller (4 cascades per request: evaluation only)
  ceiling (b)          the feature ceiling: regressors of the true ΔQ fitted on separate randomised
                       logs, from the features a router sees; the controller holds the *true* loss
                       (closed_loop.CeilingAssignment; 2 extra cascades per request: evaluation only)
  dcaf (b)             DCAF-style: ΔQ from a hand-picked feature (pages served from the cache)
                       scaled by the IPW mean loss of each strategy in exploration logs, the
                       same solver and controller (closed_loop.DcafAssignment)

Policies are compared at equal realised loss: for a budget b, the best mean saving among a
family's points whose mean realised loss is <= b (for the budget-driven families: the run
at b, and whether it kept its budget). Every run is one `comrecycle closed-loop` process;
finished runs are kept in the output folder and skipped when the command is run again.

    comrecycle closed-loop-frontier --models artifacts/models/default --estimator EST \
        --params P.json --seeds 5 7 --out runs/closed_loop_frontier
"""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

GUARDS = (2, 3, 4, 5, 6, 8, None)
RANDOM_P = (0.25, 0.5, 0.75, 1.0)
BUDGETS_PCT = (0.25, 0.5, 1.0, 2.0, 5.0)
FAMILIES = ("static-3", "random", "dcaf", "comrecycle", "ceiling", "oracle")
BUDGET_FAMILIES = ("dcaf", "comrecycle", "ceiling", "oracle")  # one run per budget b, held by the controller


@dataclass(frozen=True)
class Job:
    family: str
    knob: float | None  # M, p or b (%); None = guard off
    seed: int
    warmup: int = 0  # unmeasured requests served first (closed-loop --warmup)

    @property
    def name(self) -> str:
        k = "off" if self.knob is None else f"{self.knob:g}"
        return f"{self.family}_{k}_s{self.seed}" + (f"_w{self.warmup}" if self.warmup else "")

    def args(self, models: str, estimator: str | None, params: str | None, requests: int,
             dcaf_logs: tuple[str, ...] = (), ceiling_logs: tuple[str, ...] = ()) -> list[str]:
        a = ["closed-loop", "--models", models, "--requests", str(requests), "--seed", str(self.seed), "--quiet"]
        if self.warmup:
            a += ["--warmup", str(self.warmup)]
        if self.family == "static-3":
            return a + ["--strategy", "3"] + ([] if self.knob is None else ["--max-pages", str(int(self.knob))])
        if self.family == "random":
            return a + ["--random", str(self.knob)]
        b = ["--params", params, "--controller", "--budget", str(self.knob / 100)]
        if self.family == "oracle":
            return a + ["--oracle"] + b
        if self.family == "dcaf":
            return a + ["--dcaf-logs", *dcaf_logs] + b
        if self.family == "ceiling":
            return a + ["--feature-ceiling-logs", *ceiling_logs] + b
        return a + ["--estimator", estimator] + b


def plan(seeds, budgets_pct=BUDGETS_PCT, with_estimator=True, oracle_budgets_pct=(), with_dcaf=False,
         warmup: int = 0, ceiling_budgets_pct=()) -> list[Job]:
    """warmup applies to every family, so that all are measured on the same steady state."""
    jobs = [Job("static-3", m, s, warmup) for s in seeds for m in GUARDS]
    jobs += [Job("random", p, s, warmup) for s in seeds for p in RANDOM_P]
    if with_estimator:
        jobs += [Job("comrecycle", b, s, warmup) for s in seeds for b in budgets_pct]
    jobs += [Job("ceiling", b, s, warmup) for s in seeds for b in ceiling_budgets_pct]
    jobs += [Job("oracle", b, s, warmup) for s in seeds for b in oracle_budgets_pct]
    if with_dcaf:
        jobs += [Job("dcaf", b, s, warmup) for s in seeds for b in budgets_pct]
    return jobs


def run_jobs(jobs: list[Job], out: Path, models: str, estimator: str | None, params: str | None,
             requests: int, workers: int, progress: bool = True, dcaf_logs: tuple[str, ...] = (),
             ceiling_logs: tuple[str, ...] = ()) -> list[dict]:
    """Run the missing jobs (`workers` at a time); returns every job's metrics."""
    out.mkdir(parents=True, exist_ok=True)
    todo = [j for j in jobs if not (out / f"{j.name}.json").exists()]
    failures = []

    def one(job: Job) -> None:
        cmd = [sys.executable, "-m", "comrecycle.cli", *job.args(models, estimator, params, requests, dcaf_logs, ceiling_logs),
               "--out", str(out / f"{job.name}.json")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        (out / f"{job.name}.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            failures.append(f"{job.name}: exit {r.returncode}, see {out / (job.name + '.log')}")

    with ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=len(todo), desc="closed-loop runs", unit="run", disable=not progress) as bar:
        for _ in pool.map(one, todo):
            bar.update(1)
    if failures:
        raise RuntimeError("closed-loop runs failed:\n  " + "\n  ".join(failures))
    rows = []
    for j in jobs:
        m = json.loads((out / f"{j.name}.json").read_text())
        rows.append({"family": j.family, "knob": j.knob, "seed": j.seed, "saved_pct": m["compute_saved_pct"],
                     "loss_pct": m["effect_loss_pct"], "loss_lo": m["loss_ci95"][0], "loss_hi": m["loss_ci95"][1],
                     "predicted_loss_pct": m.get("predicted_loss_pct"), "lambda_end": m.get("lambda_end")})
    return rows


def summarise(rows: list[dict], budgets_pct=BUDGETS_PCT) -> dict:
    """Mean over seeds per (family, knob), and each family's best saving at each budget."""
    points: dict[tuple, list[dict]] = {}
    for r in rows:
        points.setdefault((r["family"], r["knob"]), []).append(r)
    means = []
    for (fam, knob), rs in points.items():
        means.append({"family": fam, "knob": knob, "seeds": len(rs),
                      "saved_pct": float(np.mean([r["saved_pct"] for r in rs])),
                      "loss_pct": float(np.mean([r["loss_pct"] for r in rs])),
                      "loss_seed_min": float(min(r["loss_pct"] for r in rs)),
                      "loss_seed_max": float(max(r["loss_pct"] for r in rs)),
                      "loss_ci_hi_max": float(max(r["loss_hi"] for r in rs))})
    at_budget = []
    families = sorted({m["family"] for m in means}, key=FAMILIES.index)
    for b in budgets_pct:
        row = {"budget_pct": b}
        for fam in families:
            ms = [m for m in means if m["family"] == fam]
            if fam in BUDGET_FAMILIES:
                hit = [m for m in ms if m["knob"] == b]
                if hit:
                    row[fam] = {"saved_pct": hit[0]["saved_pct"], "loss_pct": hit[0]["loss_pct"],
                                "within_budget": hit[0]["loss_pct"] <= b, "knob": b}
                continue
            ok = [m for m in ms if m["loss_pct"] <= b]
            best = max(ok, key=lambda m: m["saved_pct"]) if ok else None
            row[fam] = None if best is None else {"saved_pct": best["saved_pct"], "loss_pct": best["loss_pct"],
                                                  "within_budget": True, "knob": best["knob"]}
        at_budget.append(row)
    return {"points": sorted(means, key=lambda m: (m["family"], -1 if m["knob"] is None else m["knob"])),
            "at_budget": at_budget, "families": families}


def _knob(fam: str, k) -> str:
    if fam == "static-3":
        return "guard off" if k is None else f"M = {k:g}"
    return f"p = {k:g}" if fam == "random" else f"b = {k:g}%"


def markdown(summary: dict, runs: list[dict], warmup: int = 0) -> str:
    seeds = sorted({r["seed"] for r in runs})
    lines = [f"# Closed-loop frontier ({len(runs)} runs, seeds {seeds})", "",
             "Mean over seeds; realised loss = Σ(q_0 − q_served) / Σ q_0 on the policy's own cache states; "
             "compute saved includes the estimator's cost."
             + (f" Every run first served {warmup} unmeasured requests (controllers settle, caches age)."
                if warmup else ""), "",
             "| policy | knob | compute saved % | realised loss % | loss range over seeds | max 95% CI upper |",
             "|---|---|---|---|---|---|"]
    for m in summary["points"]:
        lines.append(f"| {m['family']} | {_knob(m['family'], m['knob'])} | {m['saved_pct']:.1f} | {m['loss_pct']:.2f} | "
                     f"{m['loss_seed_min']:.2f} … {m['loss_seed_max']:.2f} | {m['loss_ci_hi_max']:.2f} |")
    fams = summary["families"]
    lines += ["", "## At equal realised loss", "",
              "Best mean saving of each family with mean realised loss ≤ b (budget-driven families: the run at b; "
              "✗ = its realised loss exceeded b).", "",
              "| budget b | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
    for row in summary["at_budget"]:
        cells = []
        for f in fams:
            v = row.get(f)
            cells.append("—" if v is None else f"{v['saved_pct']:.1f}% ({_knob(f, v['knob'])}, loss {v['loss_pct']:.2f}%)"
                         + ("" if v["within_budget"] else " ✗"))
        lines.append(f"| {row['budget_pct']:g}% | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, runs: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = {"static-3": "tab:blue", "random": "tab:gray", "comrecycle": "tab:red", "oracle": "tab:green",
              "dcaf": "tab:orange", "ceiling": "tab:purple"}
    for fam in summary["families"]:
        ms = sorted([m for m in summary["points"] if m["family"] == fam], key=lambda m: m["loss_pct"])
        ax.plot([m["loss_pct"] for m in ms], [m["saved_pct"] for m in ms], "o-", color=colors[fam], label=fam,
                alpha=0.9)
        rs = [r for r in runs if r["family"] == fam]
        ax.scatter([r["loss_pct"] for r in rs], [r["saved_pct"] for r in rs], s=10, color=colors[fam], alpha=0.35)
        last_x = None
        for m in sorted(ms, key=lambda m: -1 if m["knob"] is None else m["knob"]):
            if fam in BUDGET_FAMILIES and last_x is not None and abs(m["loss_pct"] - last_x) < 0.4:
                continue  # budget runs that landed on the same point: label the first only
            last_x = m["loss_pct"]
            ax.annotate(_knob(fam, m["knob"]).replace("guard off", "no guard"), (m["loss_pct"], m["saved_pct"]),
                        fontsize=7, xytext=(3, -9), textcoords="offset points", color=colors[fam])
    for b in BUDGETS_PCT:
        ax.axvline(b, color="k", ls=":", lw=0.8)
    ax.axvline(1.0, color="k", ls="--", lw=1.2, label="budget b = 1%")
    ax.set_xlabel("realised effect loss % (closed loop, vs the full cascade on the same states)")
    ax.set_ylabel("compute saved % (estimator cost included)")
    ax.set_title("Closed-loop frontier: mean over seeds (lines), single runs (dots)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def closed_loop_frontier(models: str, out: str | Path, seeds, estimator: str | None = None, params: str | None = None,
                         requests: int = 12_000, workers: int = 2, oracle_budgets_pct=(), progress: bool = True,
                         dcaf_logs=(), warmup: int = 0, ceiling_logs=(), ceiling_budgets_pct=()) -> dict:
    """dcaf_logs: exploration logs (absolute or relative paths) that add the DCAF-style family;
    ceiling_logs + ceiling_budgets_pct: randomised logs with q_j that add the feature ceiling at
    those budgets; warmup: requests each run serves unmeasured before its measured `requests`."""
    out = Path(out)
    dcaf_logs = tuple(str(Path(p).resolve()) for p in dcaf_logs)
    ceiling_logs = tuple(str(Path(p).resolve()) for p in ceiling_logs)
    jobs = plan(seeds, with_estimator=estimator is not None, oracle_budgets_pct=oracle_budgets_pct,
                with_dcaf=bool(dcaf_logs), warmup=warmup,
                ceiling_budgets_pct=ceiling_budgets_pct if ceiling_logs else ())
    runs = run_jobs(jobs, out / "runs", models, estimator, params, requests, workers, progress, dcaf_logs,
                    ceiling_logs)
    summary = summarise(runs)
    (out / "frontier.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=2, default=float))
    with open(out / "frontier.csv", "w") as f:
        f.write("family,knob,seed,compute_saved_pct,effect_loss_pct,loss_ci_lo,loss_ci_hi,predicted_loss_pct\n")
        for r in runs:
            f.write(f"{r['family']},{'' if r['knob'] is None else r['knob']},{r['seed']},{r['saved_pct']:.4f},"
                    f"{r['loss_pct']:.4f},{r['loss_lo']:.4f},{r['loss_hi']:.4f},"
                    f"{'' if r['predicted_loss_pct'] is None else round(r['predicted_loss_pct'], 4)}\n")
    (out / "frontier.md").write_text(markdown(summary, runs, warmup) + "\n![closed-loop frontier](frontier.png)\n")
    plot(summary, runs, out / "frontier.png")
    return summary
