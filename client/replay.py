"""Session replay against a running server, in a feedback loop.

Simulated users (comrecycle.sim) request pages; each page is served by Triton (`cascade`
by default); the simulator decides views and clicks on what was served, which shapes the
users' next requests. Reports expected clicks per request (exact, from the simulator), the
error count, throughput and latency percentiles.

    python -m client.replay --url 127.0.0.1:8001 --protocol grpc --requests 2000
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from comrecycle.sim import SessionSimulator, World

from .triton_client import PROTOCOLS, CascadeClient


@dataclass
class ReplayReport:
    model: str
    protocol: str
    requests: int
    errors: int
    concurrency: int
    seconds: float
    throughput_rps: float
    expected_clicks_per_request: float
    clicks_per_request: float
    latency_ms: dict = field(default_factory=dict)
    first_errors: list = field(default_factory=list)

    def summary(self) -> str:
        lat = self.latency_ms
        return (f"{self.model} over {self.protocol}: {self.requests} requests ({self.errors} errors) "
                f"in {self.seconds:.1f}s = {self.throughput_rps:.1f} req/s at concurrency {self.concurrency}; "
                f"expected clicks/request {self.expected_clicks_per_request:.4f}; "
                f"latency p50 {lat.get('p50', float('nan')):.2f} ms, p95 {lat.get('p95', float('nan')):.2f} ms, "
                f"p99 {lat.get('p99', float('nan')):.2f} ms")


def latency_summary(seconds: list[float]) -> dict:
    if not seconds:
        return {}
    ms = np.asarray(seconds) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()), "max": float(ms.max())}


async def replay_async(client: CascadeClient, world: World, n_requests: int, concurrency: int = 16,
                       seed: int = 0, model: str = "cascade", progress: bool = True) -> ReplayReport:
    sim = SessionSimulator(world, seed=seed, concurrency=concurrency)
    latencies: list[float] = []
    errors: list[str] = []
    loop = asyncio.get_running_loop()

    def serve(batch):
        async def one(i):
            return await client.timed_infer(model, batch.context(i))

        async def all_():
            return await asyncio.gather(*[one(i) for i in range(len(batch))])

        results = asyncio.run_coroutine_threadsafe(all_(), loop).result()
        pages = []
        for r in results:
            latencies.append(r.seconds)
            if r.error is not None:
                errors.append(r.error)
                pages.append(np.zeros(0, np.int64))  # the user sees an empty page
            else:
                pages.append(r.outputs["rerank_items"])
        return pages

    t0 = time.perf_counter()
    log = await loop.run_in_executor(None, lambda: sim.run(n_requests, serve, progress=progress,
                                                           desc=f"replay {model}"))
    secs = time.perf_counter() - t0
    table = log.table()
    return ReplayReport(
        model=model, protocol=client.protocol, requests=table.num_rows, errors=len(errors),
        concurrency=concurrency, seconds=secs, throughput_rps=table.num_rows / secs,
        expected_clicks_per_request=float(np.mean(table["expected_reward"].to_numpy())),
        clicks_per_request=float(np.mean(table["reward"].to_numpy())),
        latency_ms=latency_summary(latencies), first_errors=errors[:5])


def replay(url: str, protocol: str, world: World, n_requests: int, concurrency: int = 16, seed: int = 0,
           model: str = "cascade", progress: bool = True) -> ReplayReport:
    async def main():
        async with CascadeClient(url, protocol) as c:
            return await replay_async(c, world, n_requests, concurrency, seed, model, progress)

    return asyncio.run(main())


def world_from_repository(repo: str | Path) -> World:
    """The simulated world of the model set installed in a model repository."""
    from comrecycle.build import world_for

    mpath = Path(repo) / "manifest.json"
    if not mpath.exists():
        raise FileNotFoundError(f"{mpath} not found: the repository has no installed model set "
                                f"(run build_models.py)")
    return world_for(json.loads(mpath.read_text()))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m client.replay", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="host:port of the server (HTTP or gRPC port)")
    ap.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    ap.add_argument("--repository", default="model_repository",
                    help="model repository whose manifest names the simulated world")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent sessions (in-flight requests)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--model", default="cascade")
    ap.add_argument("--json", help="also write the report here")
    a = ap.parse_args(argv)
    rep = replay(a.url, a.protocol, world_from_repository(a.repository), a.requests, a.concurrency,
                 a.seed, a.model)
    print(rep.summary())
    if a.json:
        Path(a.json).write_text(json.dumps(asdict(rep), indent=2))
    return 0 if rep.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
