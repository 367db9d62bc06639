"""perf_analyzer against `recycle_router` (74% repeated requests of users with live cache
entries) versus the always-full path (`cascade` on the same users), in one run.

Starts redis-server and the embedded tritonserver on the model repository (the estimator and
router params are installed by the main job's `ensure_router` when missing), warms the cache
of the repeated users with one initial request each, writes perf_analyzer --input-data, and
measures over gRPC:

  * router_mix74   recycle_router, 74% repeated (users with a live entry) + 26% initial
                   (new_session = 1), at each concurrency
  * cascade        the always-full path on the same users' contexts
  * router_repeat  repeated requests only (p50 of strategy-3 requests vs a full cascade)
  * router_initial initial requests only (router overhead vs calling `cascade` directly)

The strategy mix the router chose during each run is read from its Prometheus counters. Every
router run also writes perf_analyzer's --profile-export-file (each request's timestamps and
outputs), from which the report takes the client-side latency of each strategy's requests:
the p50 of a strategy-3 request, as the target defines it, not of a mix of strategies.
Writes results.csv, results.md and results.json in --out.

Every load point runs --rounds times; within a round the cascade run and the router runs of
that concurrency are back to back, and the report gives each target's ratio per round and
its median (this shared 2-core machine drifts by +-20% over minutes).

    python -m perf.router_perf --concurrency 1 4 16 --rounds 3 --out runs/router_perf
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from comrecycle.repository import DEFAULT_REPOSITORY
from comrecycle.router.batch import PHASES
from comrecycle.specs import ROUTER, STRATEGIES, router_request

from .perf_analyzer_run import format_rows, run_perf, write_input_data, write_rows_csv

REPO_ROOT = Path(__file__).resolve().parents[1]
REPEAT_SHARE = 0.74
METRICS_LAG_S = 1.2  # > 2 x the router's metrics_flush_s (0.5 s)


def _contexts(repo: Path, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    from .cascade_perf import cascade_input_data

    seen, out = set(), []
    for c in cascade_input_data(repo, 4 * n, seed=seed):  # distinct users only
        u = int(c["user_id"][0])
        if u not in seen:
            seen.add(u)
            out.append(c)
        if len(out) == n:
            break
    return out


async def _warm(url: str, contexts) -> list[np.ndarray]:
    """One initial router request per user (new_session = 1): their cache entries go live."""
    from client.triton_client import CascadeClient

    async with CascadeClient(url, "grpc") as c:
        async def one(ctx):
            out = await c.infer(ROUTER, _router_request(ctx, np.zeros(0, np.int64), new_session=1))
            return out["page_items"]
        return await asyncio.gather(*[one(ctx) for ctx in contexts])


def _router_request(ctx, page: np.ndarray, new_session: int) -> dict[str, np.ndarray]:
    viewed = page[:3] if page.size else [0]  # perf_analyzer needs non-empty shapes
    clicked = page[:1] if page.size else [0]
    history = ctx["history"] if ctx["history"].size else [0]
    return router_request(int(ctx["user_id"][0]), ctx["user_features"], history, viewed, clicked,
                          new_session=bool(new_session))


def strategy_latencies(export: dict) -> dict[int, np.ndarray]:
    """Client-side latency (us) of each strategy's requests in a perf_analyzer profile export
    (--profile-export-file), counting the requests that start and end inside the measurement
    windows, as perf_analyzer's own statistics do. A request with an error (no outputs) counts
    under -1."""
    out: dict[int, list] = {}
    for exp in export["experiments"]:
        bounds = exp.get("window_boundaries") or []
        lo, hi = (int(bounds[0]), int(bounds[-1])) if len(bounds) >= 2 else (-1, 2**63)
        for req in exp["requests"]:
            start, ends = int(req["timestamp"]), req.get("response_timestamps") or []
            if not ends or start < lo or int(ends[-1]) > hi:
                continue
            outputs = req.get("response_outputs") or [{}]
            strategy = outputs[-1].get("strategy", -1)
            strategy = int(strategy[0] if isinstance(strategy, list) else strategy)
            out.setdefault(strategy, []).append((int(ends[-1]) - start) / 1e3)
    return {j: np.asarray(v) for j, v in sorted(out.items())}


def strategy_columns(latencies: dict[int, np.ndarray]) -> dict[str, float]:
    """Row columns s{j}_count, s{j}_p50_us, s{j}_p99_us per strategy (j = -1: errors)."""
    cols: dict[str, float] = {}
    for j, v in latencies.items():
        name = f"s{j}" if j >= 0 else "error"
        cols[f"{name}_count"] = int(v.size)
        cols[f"{name}_p50_us"] = float(np.percentile(v, 50))
        cols[f"{name}_p99_us"] = float(np.percentile(v, 99))
    return cols


_METRIC_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)(?:\s+-?\d+)?\s*$')
_LABEL = re.compile(r'(?:^|,)\s*(?P<key>[a-zA-Z_][a-zA-Z0-9_]*)="(?P<value>[^"]*)"')


def parse_router_counters(text: str) -> dict:
    """The router's counters in a Prometheus text exposition: requests by strategy ("requests",
    [4]) and, per phase of a router batch, the summed seconds and the number of batches
    ("phase_sum", "phase_count"). Labels may come in any order; an optional timestamp is
    ignored."""
    out = {"requests": np.zeros(4), "phase_sum": {}, "phase_count": {}}
    for line in text.splitlines():
        m = _METRIC_LINE.match(line)
        if m is None:
            continue
        labels = {lm["key"]: lm["value"] for lm in _LABEL.finditer(m["labels"])}
        name, value = m["name"], float(m["value"])
        if name == "comrecycle_router_requests_total" and labels.get("strategy", "").isdigit():
            j = int(labels["strategy"])
            if 0 <= j < 4:
                out["requests"][j] += value
        elif name in ("comrecycle_router_phase_seconds_sum", "comrecycle_router_phase_seconds_count") \
                and "phase" in labels:
            key = "phase_sum" if name.endswith("_sum") else "phase_count"
            out[key][labels["phase"]] = out[key].get(labels["phase"], 0.0) + value
    return out


def _router_counters(metrics_url: str) -> dict:
    """parse_router_counters of the server's /metrics, read after the router's flush lag."""
    time.sleep(METRICS_LAG_S)  # the router sends its counters every metrics_flush_s
    return parse_router_counters(urllib.request.urlopen(metrics_url, timeout=5).read().decode())


def phase_columns(before: dict, after: dict) -> dict:
    """Row columns of one run from the router's counters before and after it: the mean wall
    time of each phase of a router batch (phase_<name>_ms) and the mean batch size (answered
    requests, counted by strategy, per batch; batches counted on the parse phase, which every
    batch passes)."""
    cols = {}
    for phase, total in after["phase_sum"].items():
        n = after["phase_count"].get(phase, 0.0) - before["phase_count"].get(phase, 0.0)
        if n > 0:
            cols[f"phase_{phase}_ms"] = 1e3 * (total - before["phase_sum"].get(phase, 0.0)) / n
    batches = after["phase_count"].get("parse", 0.0) - before["phase_count"].get("parse", 0.0)
    if batches > 0:
        cols["mean_batch"] = float((after["requests"] - before["requests"]).sum() / batches)
    return cols


def run(repo: Path, out: Path, concurrency: list[int], measurement_ms: int, n_users: int,
        rounds: int = 1) -> dict:
    from comrecycle.repository import repository_server
    from comrecycle.serving.redis_server import RedisServer

    out.mkdir(parents=True, exist_ok=True)
    contexts = _contexts(repo, n_users, seed=23)
    n_rep = int(round(REPEAT_SHARE * len(contexts)))
    warm, cold = contexts[:n_rep], contexts[n_rep:]
    rows, mixes = [], {}
    with RedisServer() as redis_srv, repository_server(
            repo, env={"COMRECYCLE_REDIS_URL": redis_srv.url}, startup_timeout=300) as srv:
        print(f"servers ready (tritonserver {srv.startup_seconds:.1f}s); warming {len(warm)} users ...", flush=True)
        pages = asyncio.run(_warm(srv.grpc_url, warm))
        repeated = [_router_request(c, p, 0) for c, p in zip(warm, pages)]
        initial = [_router_request(c, np.zeros(0, np.int64), 1) for c in cold]
        # interleave so that any window of requests holds ~74% repeats
        order = np.argsort(np.r_[np.arange(len(repeated)) / len(repeated), np.arange(len(initial)) / len(initial)],
                           kind="stable")
        mix = [(repeated + initial)[k] for k in order]
        files = {"router_mix74": write_input_data(out / "router_mix74.json", mix),
                 "router_repeat": write_input_data(out / "router_repeat.json", repeated),
                 "router_initial": write_input_data(out / "router_initial.json", initial),
                 "cascade": write_input_data(out / "cascade.json", [
                     {**{k: c[k] for k in ("user_id", "user_features", "request_features")},
                      "history": c["history"] if c["history"].size else np.array([0], np.int64),
                      "exclude_items": np.array([0], np.int64)} for c in warm + cold])}
        # rounds x levels, each level's runs back to back (cascade first): the ratios compare
        # runs minutes apart at most, so the machine's drift (+-20% on this shared box) cancels
        plan = []
        for rnd in range(rounds):
            for level in concurrency:
                plan += [(rnd, "cascade", "cascade", level), (rnd, "router_mix74", ROUTER, level)]
                if level in (concurrency[0], concurrency[-1]):
                    plan += [(rnd, "router_repeat", ROUTER, level), (rnd, "router_initial", ROUTER, level)]
        exports = Path(tempfile.mkdtemp(prefix="router_perf-"))  # MBs each: parsed, then removed
        for rnd, label, model, level in plan:
            print(f"[round {rnd + 1}/{rounds}] perf_analyzer {label} concurrency {level} ...", flush=True)
            before = _router_counters(srv.metrics_endpoint) if model == ROUTER else None
            export = exports / f"{label}_c{level}_r{rnd}.json"
            got = run_perf(model, srv.grpc_url, "grpc", [level], input_data=str(files[label]),
                           label=label, **measurement_args(measurement_ms),
                           extra_args=["--profile-export-file", str(export)] if model == ROUTER else ())
            by_strategy = {}
            if export.is_file():
                by_strategy = strategy_columns(strategy_latencies(json.loads(export.read_text())))
                export.unlink()
            phases = {}
            if before is not None:
                after = _router_counters(srv.metrics_endpoint)
                d = after["requests"] - before["requests"]
                mixes[f"{label}@{level}#{rnd}"] = (d / max(d.sum(), 1)).round(4).tolist()
                phases = phase_columns(before, after)
            rows += [{**r, "round": rnd, **by_strategy, **phases} for r in got]
        shutil.rmtree(exports, ignore_errors=True)
    write_rows_csv(rows, out / "results.csv")
    res = {"rows": rows, "strategy_mix": mixes, "rounds": rounds,
           "users": {"repeated": len(warm), "initial": len(cold)},
           "measurement": measurement_args(measurement_ms)}
    (out / "results.json").write_text(json.dumps(res, indent=2, default=float))
    (out / "results.md").write_text(markdown(res))
    return res


WINDOWS = 3


def measurement_args(measurement_ms: int) -> dict:
    """perf_analyzer settings of one load point: WINDOWS time windows that fill measurement_ms,
    whatever their spread. The router's mix drifts as the warmed caches age (the depth guard
    refreshes every few pages), so perf_analyzer's stability check (3 windows within 10%) can
    fail; it is turned off (a 1000% band), and the load point reports the mean of the windows.
    Time windows, not a request count: perf_analyzer times a fixed-count run in whole seconds,
    which quantised a 14 s run's throughput by 7%."""
    return {"measurement_mode": "time_windows", "measurement_interval_ms": max(1000, measurement_ms // WINDOWS),
            "stability_percentage": 1000, "max_trials": WINDOWS}


# key -> (router run, baseline run, what, metric or (run metric, baseline metric), goal text),
# in the report's order. The baseline is `cascade` called directly, except for the mix against
# always-full *through the router* (every request a new session, so a full cascade on the
# router's own stage runtimes): the gain recycling alone brings, apart from the router's
# cheaper way of running a cascade.
COMPARISONS = {
    "router_mix74": ("router_mix74", "cascade", "throughput, 74% repeated mix / always-full",
                     "throughput_infer_per_s", ">= 1.5x"),
    "router_mix74/router_initial": ("router_mix74", "router_initial",
                                    "throughput, 74% repeated mix / always-full through the router",
                                    "throughput_infer_per_s", "(recycling alone)"),
    "router_repeat/s3": ("router_repeat", "cascade", "p50 of a strategy-3 request / full cascade",
                         ("s3_p50_us", "p50_us"), "<= 0.3x"),
    "router_mix74/s3": ("router_mix74", "cascade", "p50 of a strategy-3 request in the 74% mix / full cascade",
                        ("s3_p50_us", "p50_us"), "(under the mix's load)"),
    "router_repeat": ("router_repeat", "cascade", "p50 of any repeated request (~75% recycled) / full cascade",
                      "p50_us", "(strategies 0 and 3 together)"),
    "router_initial": ("router_initial", "cascade", "p50 of an initial request via the router / cascade directly",
                       "p50_us", "<= 1.15x"),
}


def ratios(res: dict) -> dict:
    """(comparison key, concurrency) -> the run / baseline ratio of each round, pairing runs of
    the same round and level (COMPARISONS)."""
    by = {(r["label"], r["concurrency"], r.get("round", 0)): r for r in res["rows"]}
    out: dict = {}
    for (label, c, rnd), r in sorted(by.items()):
        for key, (run, baseline, _, metric, _) in COMPARISONS.items():
            metric, base_metric = (metric, metric) if isinstance(metric, str) else metric
            base = by.get((baseline, c, rnd))
            if label == run and base is not None and r.get(metric) is not None:
                out.setdefault((key, c), []).append(r[metric] / base[base_metric])
    return out


def markdown(res: dict) -> str:
    rows = res["rows"]
    lines = ["| round | run | concurrency | infer/s | p50 ms | p99 ms | strategy mix 0/1/2/3 "
             "| p50 / p99 ms by strategy (client side) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rnd = r.get("round", 0)
        mix = res["strategy_mix"].get(f"{r['label']}@{r['concurrency']}#{rnd}")
        by = [f"{j}: {r[f'{j}_p50_us'] / 1e3:.2f} / {r[f'{j}_p99_us'] / 1e3:.2f}"
              for j in [f"s{k}" for k in STRATEGIES] + ["error"] if r.get(f"{j}_p50_us") is not None]
        lines.append(f"| {rnd + 1} | {r['label']} | {r['concurrency']} | {r['throughput_infer_per_s']:.1f} | "
                     f"{r['p50_us'] / 1e3:.2f} | {r['p99_us'] / 1e3:.2f} | "
                     f"{'/'.join(f'{100 * m:.0f}%' for m in mix) if mix else '—'} | {', '.join(by) or '—'} |")
    phased = [r for r in rows if any(k.startswith("phase_") for k in r)]
    if phased:
        names = [p for p in PHASES if any(f"phase_{p}_ms" in r for r in phased)]
        lines += ["", "Where the router's time goes: mean ms per router batch, by phase (the router's "
                  "comrecycle_router_phase_seconds), and the mean batch size.", "",
                  f"| round | run | concurrency | {' | '.join(names)} | answered requests per batch |",
                  "|---|---|---|" + "---|" * len(names) + "---|"]
        for r in phased:
            cells = [f"{r[f'phase_{p}_ms']:.2f}" if f"phase_{p}_ms" in r else "—" for p in names]
            lines.append(f"| {r.get('round', 0) + 1} | {r['label']} | {r['concurrency']} | {' | '.join(cells)} | "
                         f"{r.get('mean_batch', float('nan')):.2f} |")
    lines += ["", "| target | concurrency | median over rounds | each round | goal |", "|---|---|---|---|---|"]
    for (key, c), rs in sorted(ratios(res).items(), key=lambda kv: (list(COMPARISONS).index(kv[0][0]), kv[0][1])):
        _, _, what, _, goal = COMPARISONS[key]
        lines.append(f"| {what} | {c} | {np.median(rs):.2f}x | {', '.join(f'{x:.2f}' for x in rs)} | {goal} |")
    return "\n".join(lines) + "\n"


def missing_router_install(repo: Path) -> list[str]:
    """What the router needs that the repository lacks: an estimator version with model.onnx and
    a recycle_router version with params.json ([] when both are installed)."""
    from comrecycle.serving.layout import installed_versions

    need = (("estimator", "model.onnx"), ("recycle_router", "params.json"))
    return [f"{model}/<version>/{file}" for model, file in need if not installed_versions(repo / model, file)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.router_perf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", default=str(DEFAULT_REPOSITORY["cpu"]),
                    help="model repository with an installed model set, estimator and router params")
    ap.add_argument("--models", default=str(REPO_ROOT / "artifacts" / "models" / "default"),
                    help="model set (to train/install the estimator and params if the repository lacks them)")
    ap.add_argument("--no-install", action="store_true",
                    help="use the estimator and router params already installed in --repository as they "
                         "are (a GPU node need not hold the model set or the training logs)")
    ap.add_argument("--out", default=str(REPO_ROOT / "runs" / "router_perf"))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--measurement-ms", type=int, default=15000,
                    help=f"measured time per load point, in {WINDOWS} perf_analyzer windows")
    ap.add_argument("--users", type=int, default=400, help="distinct users in the input data")
    ap.add_argument("--rounds", type=int, default=3,
                    help="repeat every load point; each ratio pairs runs of the same round, back to back")
    a = ap.parse_args(argv)
    repo = Path(a.repository)
    if not (repo / "manifest.json").exists():
        print(f"error: {repo} has no installed model set; run `bash scripts/demo.sh` or "
              f"`python build_models.py` first", file=sys.stderr)
        return 2
    if a.no_install:
        missing = missing_router_install(repo)
        if missing:
            print(f"error: --no-install, but {repo} lacks {' and '.join(missing)}; install them with "
                  f"`comrecycle demo` or run without --no-install", file=sys.stderr)
            return 2
    else:
        from comrecycle.policy.deploy import ensure_router

        ensure_router(repo, Path(a.models))
    t0 = time.time()
    res = run(repo, Path(a.out), sorted(a.concurrency), a.measurement_ms, a.users, a.rounds)
    print(format_rows(res["rows"]))
    print(markdown(res))
    print(f"wrote {Path(a.out) / 'results.md'} in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
