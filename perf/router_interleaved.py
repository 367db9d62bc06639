"""Single-request latency at concurrency 1, interleaved: for each user, a `cascade` call, an
initial `recycle_router` request (new_session = 1), then a repeated one with the page's
feedback. Interleaving puts the three paths side by side in time, so the machine's drift
cancels out of the ratios (perf_analyzer runs each path for tens of seconds in a row).

Prints the p50 of each path and the ratios initial / cascade and strategy 3 / cascade, and
the router's phase breakdown (comrecycle_router_phase_seconds) of the initial and of the
repeated requests.

    python -m perf.router_interleaved --users 100 --rounds 2
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from comrecycle.router.core import PHASES
from comrecycle.repository import DEFAULT_REPOSITORY
from comrecycle.specs import ROUTER

from .router_perf import _contexts, _router_request

REPO_ROOT = Path(__file__).resolve().parents[1]


def phase_sums(metrics_url: str) -> dict[str, np.ndarray]:
    """phase -> [seconds, batches] summed over the router's instances and versions."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    out = {p: np.zeros(2) for p in PHASES}
    for line in text.splitlines():
        for p in PHASES:
            if f'phase="{p}"' in line:
                if line.startswith("comrecycle_router_phase_seconds_sum"):
                    out[p][0] += float(line.rsplit(" ", 1)[1])
                elif line.startswith("comrecycle_router_phase_seconds_count"):
                    out[p][1] += float(line.rsplit(" ", 1)[1])
    return out


async def measure(url: str, metrics_url: str, contexts, rounds: int) -> dict:
    from client.triton_client import CascadeClient

    lat: dict[str, list[float]] = {"cascade": [], "initial": [], "strategy 3": [], "repeated, other": []}
    phases = {kind: {p: np.zeros(2) for p in PHASES} for kind in ("initial", "repeated")}
    async with CascadeClient(url, "grpc") as c:
        for ctx in contexts[:10]:  # warm-up
            await c.infer(ROUTER, _router_request(ctx, np.zeros(0, np.int64), 1))
        for _ in range(rounds):
            for ctx in contexts:
                req = {k: ctx[k] for k in ("user_id", "user_features", "request_features")}
                req["history"] = ctx["history"] if ctx["history"].size else np.array([0], np.int64)
                req["exclude_items"] = np.array([0], np.int64)
                t = time.perf_counter()
                await c.infer("cascade", req)
                lat["cascade"].append(time.perf_counter() - t)
                before = phase_sums(metrics_url)
                t = time.perf_counter()
                out = await c.infer(ROUTER, _router_request(ctx, np.zeros(0, np.int64), 1))
                lat["initial"].append(time.perf_counter() - t)
                await asyncio.sleep(0.01)  # let the write-back and metrics of that batch finish
                mid = phase_sums(metrics_url)
                t = time.perf_counter()
                out = await c.infer(ROUTER, _router_request(ctx, out["page_items"], 0))
                dt = time.perf_counter() - t
                lat["strategy 3" if int(np.ravel(out["strategy"])[0]) == 3 else "repeated, other"].append(dt)
                await asyncio.sleep(0.01)
                after = phase_sums(metrics_url)
                for p in PHASES:
                    phases["initial"][p] += mid[p] - before[p]
                    phases["repeated"][p] += after[p] - mid[p]
    p50 = {k: 1e3 * float(np.median(v)) for k, v in lat.items() if v}
    return {"p50_ms": p50, "n": {k: len(v) for k, v in lat.items()},
            "initial_over_cascade": p50["initial"] / p50["cascade"],
            "strategy3_over_cascade": p50.get("strategy 3", float("nan")) / p50["cascade"],
            "phase_ms": {kind: {p: 1e3 * v[0] / max(v[1], 1) for p, v in ph.items()}
                         for kind, ph in phases.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.router_interleaved", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", default=str(DEFAULT_REPOSITORY["cpu"]),
                    help="model repository with an installed model set, estimator and router params")
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=2, help="passes over the users")
    ap.add_argument("--out", help="also write the result as JSON")
    a = ap.parse_args(argv)
    repo = Path(a.repository)
    if not (repo / "manifest.json").exists():
        print(f"error: {repo} has no installed model set; run `bash scripts/demo.sh` first", file=sys.stderr)
        return 2
    from comrecycle.repository import repository_server
    from comrecycle.serving.redis_server import RedisServer

    contexts = _contexts(repo, a.users, seed=23)
    with RedisServer() as redis_srv, repository_server(
            repo, env={"COMRECYCLE_REDIS_URL": redis_srv.url,
                       # phase sums are read after every request: metrics sent after every batch
                       "COMRECYCLE_ROUTER_METRICS_FLUSH_S": "0"}, startup_timeout=300) as srv:
        res = asyncio.run(measure(srv.grpc_url, srv.metrics_endpoint, contexts, a.rounds))
    print("p50 ms: " + ", ".join(f"{k} {v:.2f} (n={res['n'][k]})" for k, v in res["p50_ms"].items()))
    print(f"initial / cascade = {res['initial_over_cascade']:.2f}x (target <= 1.15x); "
          f"strategy 3 / cascade = {res['strategy3_over_cascade']:.2f}x (target <= 0.3x)")
    for kind, ph in res["phase_ms"].items():
        print(f"{kind} requests, router phases (ms per batch): " + ", ".join(f"{p} {v:.2f}" for p, v in ph.items()))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
