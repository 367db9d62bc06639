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
from typing import Callable

import numpy as np

from comrecycle.sim import SessionSimulator, World
from comrecycle.sim.router_loop import RouterInTheLoop

from comrecycle.specs import ROUTER

from .triton_client import PROTOCOLS, CascadeClient, ServerUnreachable, Timed


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
        text = (f"{self.model} over {self.protocol}: {self.requests} requests ({self.errors} errors) "
                f"in {self.seconds:.1f}s = {self.throughput_rps:.1f} req/s at concurrency {self.concurrency}; "
                f"expected clicks/request {self.expected_clicks_per_request:.4f}; "
                f"latency p50 {lat.get('p50', float('nan')):.2f} ms, p95 {lat.get('p95', float('nan')):.2f} ms, "
                f"p99 {lat.get('p99', float('nan')):.2f} ms")
        return text + _first_error_line(self.errors, self.first_errors)


def _first_error_line(errors: int, first_errors: list) -> str:
    return f"\nfirst error (of {errors}): {first_errors[0]}" if errors and first_errors else ""


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
            await c.check(model)  # one clear line instead of one error per page when nothing answers
            return await replay_async(c, world, n_requests, concurrency, seed, model, progress)

    return asyncio.run(main())


def check_server(url: str, protocol: str, model: str) -> None:
    """ServerUnreachable (one line: URL, protocol, first error) unless `model` is ready there."""
    async def main():
        async with CascadeClient(url, protocol) as c:
            await c.check(model)

    asyncio.run(main())


def world_from_repository(repo: str | Path) -> World:
    """The simulated world of the model set installed in a model repository."""
    from comrecycle.sim.world import world_for

    mpath = Path(repo) / "manifest.json"
    if not mpath.exists():
        raise FileNotFoundError(f"{mpath} not found: the repository has no installed model set "
                                f"(run build_models.py)")
    return world_for(json.loads(mpath.read_text()))


def main(argv: list[str] | None = None, prog: str = "python -m client.replay") -> int:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="host:port of the server (its HTTP or gRPC port)")
    ap.add_argument("--protocol", choices=PROTOCOLS, default="grpc")
    ap.add_argument("--repository", default="artifacts/model_repository/cpu",
                    help="model repository whose manifest names the simulated world")
    ap.add_argument("--requests", type=int, default=2000, help="requests to replay (>= 1)")
    ap.add_argument("--concurrency", type=int, default=16, help="concurrent sessions (in-flight requests)")
    ap.add_argument("--seed", type=int, default=1, help="simulator seed (the same seed replays the same users)")
    ap.add_argument("--model", default="cascade",
                    help=f"served model to call: cascade (the full cascade for every request, the default) or "
                         f"{ROUTER} (the client sends the previous page's viewed/clicked items, request_time and "
                         f"new_session, as the main job does; reports the strategy mix)")
    ap.add_argument("--json", help="also write the report here")
    a = ap.parse_args(argv)
    if a.requests < 1 or a.concurrency < 1:
        ap.error(f"--requests and --concurrency must be >= 1, got {a.requests} and {a.concurrency}")
    try:
        check_server(a.url, a.protocol, a.model)  # before the world is built: a dead port fails in seconds
        world = world_from_repository(a.repository)
        if a.model == ROUTER:
            rep = replay_router(a.url, a.protocol, world, a.requests, a.concurrency, a.seed)
            summary, report = rep.summary(a.protocol, a.concurrency), rep.report()
        else:
            rep = replay(a.url, a.protocol, world, a.requests, a.concurrency, a.seed, a.model)
            summary, report = rep.summary(), asdict(rep)
    except (ServerUnreachable, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    print(summary)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0 if rep.errors == 0 else 1




# ---- through recycle_router -------------------------------------------------------------------
@dataclass
class RouterReplay:
    """A replay through recycle_router: per request its strategy, latency, expected clicks and
    session, so that the main job can compare it with always-full on the same seeds."""

    model: str
    requests: int
    errors: int
    seconds: float
    strategy: np.ndarray  # [n] int (-1 = error)
    latency_s: np.ndarray  # [n]
    expected_clicks: np.ndarray  # [n] exact, from the simulator
    session_id: np.ndarray  # [n]
    is_repeat: np.ndarray  # [n] bool
    first_errors: list = field(default_factory=list)
    # for a paired evaluation (shadow_full_cascade): what each request saw and was served
    contexts: list = field(default_factory=list, repr=False)
    interests: np.ndarray | None = field(default=None, repr=False)
    pages: list = field(default_factory=list, repr=False)

    def latency_by_strategy(self) -> dict:
        return {int(j): latency_summary(list(self.latency_s[self.strategy == j]))
                for j in np.unique(self.strategy) if j >= 0}

    def mix(self, repeated_only: bool = False) -> dict[int, float]:
        """Share of each strategy (0-3) over all answered requests, or over the repeated ones."""
        ok = self.strategy >= 0
        if repeated_only:
            ok &= self.is_repeat
        n = int(ok.sum())
        return {j: float((self.strategy[ok] == j).sum() / n) if n else 0.0 for j in range(4)}

    def report(self) -> dict:
        return {"model": self.model, "requests": self.requests, "errors": self.errors, "seconds": self.seconds,
                "throughput_rps": self.requests / self.seconds if self.seconds else None,
                "repeated_requests": int(self.is_repeat.sum()),
                "mix_all_requests": self.mix(), "mix_repeated_requests": self.mix(repeated_only=True),
                "expected_clicks_per_request": float(self.expected_clicks.mean()) if self.requests else None,
                "latency_ms": latency_summary(list(self.latency_s)),
                "latency_ms_by_strategy": self.latency_by_strategy(), "first_errors": self.first_errors}

    def summary(self, protocol: str, concurrency: int) -> str:
        r = self.report()

        def fmt(mix: dict) -> str:
            return " / ".join(f"{100 * mix[j]:.1f}" for j in range(4))

        lat = r["latency_ms"]
        return (f"{self.model} over {protocol}: {self.requests} requests ({self.errors} errors) in "
                f"{self.seconds:.1f}s = {r['throughput_rps'] or 0:.1f} req/s at concurrency {concurrency}\n"
                f"strategy mix 0/1/2/3 (% of all {self.requests - self.errors} answered requests): "
                f"{fmt(r['mix_all_requests'])}\n"
                f"strategy mix 0/1/2/3 (% of the {r['repeated_requests']} repeated requests): "
                f"{fmt(r['mix_repeated_requests'])}\n"
                f"expected clicks/request {r['expected_clicks_per_request'] or 0:.4f}; latency p50 "
                f"{lat.get('p50', float('nan')):.2f} ms, p99 {lat.get('p99', float('nan')):.2f} ms"
                + _first_error_line(self.errors, self.first_errors))


def client_sender(client: CascadeClient, loop, model: str) -> Callable[[list], list[Timed]]:
    """Requests -> one Timed answer each, sent concurrently to `model` through `client` on `loop`."""
    def send(requests: list[dict[str, np.ndarray]]) -> list[Timed]:
        async def all_():
            return await asyncio.gather(*[client.timed_infer(model, r) for r in requests])

        return asyncio.run_coroutine_threadsafe(all_(), loop).result()

    return send


class _FullServe(RouterInTheLoop):
    """The always-full path: `cascade` for every request (strategy 0)."""

    page_output = "rerank_items"

    def request(self, batch, i: int) -> dict[str, np.ndarray]:
        return batch.context(i)

    def strategy(self, outputs: dict[str, np.ndarray]) -> int:
        return 0

    def token(self, outputs: dict[str, np.ndarray]) -> int | None:
        return None


async def _replay(serve: RouterInTheLoop, world: World, n_requests: int, concurrency: int, seed: int,
                  progress: bool, desc: str) -> RouterReplay:
    sim = SessionSimulator(world, seed=seed, concurrency=concurrency)
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    await loop.run_in_executor(None, lambda: sim.run(n_requests, serve, progress=progress, desc=desc))
    secs = time.perf_counter() - t0
    s, lat, ec, sess, rep = (np.array(x) for x in zip(*serve.rows))
    return RouterReplay(serve.model, len(serve.rows), len(serve.errors), secs, s.astype(np.int64), lat, ec,
                        sess.astype(np.int64), rep.astype(bool), serve.errors[:5], serve.contexts,
                        np.stack(serve.interests), serve.pages)


async def replay_router_async(client: CascadeClient, world: World, n_requests: int, concurrency: int = 16,
                              seed: int = 0, model: str = "recycle_router", progress: bool = True) -> RouterReplay:
    serve = RouterInTheLoop(client_sender(client, asyncio.get_running_loop(), model), model)
    return await _replay(serve, world, n_requests, concurrency, seed, progress, f"replay {model}")


async def replay_full_async(client: CascadeClient, world: World, n_requests: int, concurrency: int = 16,
                            seed: int = 0, progress: bool = True) -> RouterReplay:
    """The always-full path on the same seeds: `cascade` for every request, as a RouterReplay."""
    serve = _FullServe(client_sender(client, asyncio.get_running_loop(), "cascade"), "cascade")
    return await _replay(serve, world, n_requests, concurrency, seed, progress, "replay always-full (cascade)")


def replay_router(url: str, protocol: str, world: World, n_requests: int, concurrency: int = 16, seed: int = 0,
                  progress: bool = True) -> RouterReplay:
    """Sessions replayed through recycle_router with the client in the loop (as the main job does)."""
    async def main():
        async with CascadeClient(url, protocol) as c:
            await c.check(ROUTER)
            return await replay_router_async(c, world, n_requests, concurrency, seed, progress=progress)

    return asyncio.run(main())


def replay_pair(url: str, world: World, n_requests: int, concurrency: int = 16, seed: int = 0,
                progress: bool = True) -> tuple[RouterReplay, RouterReplay]:
    """recycle_router, then always-full, on the same simulator seed (gRPC)."""
    async def main():
        async with CascadeClient(url, "grpc") as c:
            routed = await replay_router_async(c, world, n_requests, concurrency, seed, progress=progress)
            full = await replay_full_async(c, world, n_requests, concurrency, seed, progress)
            return routed, full

    return asyncio.run(main())


def shadow_full_cascade(replay: RouterReplay, world: World, model_dir, chunk: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Paired evaluation of a router replay: for every request, the exact expected clicks of the
    page it was served and of the page the full cascade would have served on the same state
    (same context, session exclusions and interest), run in-process after the replay so that
    it does not disturb the timings. Returns (q_served [n], q_full [n])."""
    from comrecycle.runtime.cascade import InProcessCascade
    from comrecycle.sim.recycling import page_expected_clicks

    cascade = InProcessCascade.load(model_dir)
    q_full = np.empty(replay.requests)
    for lo in range(0, replay.requests, chunk):
        idx = range(lo, min(lo + chunk, replay.requests))
        outs = cascade.run([replay.contexts[i] for i in idx], strategy=0)
        pages = [o["rerank_items"] for o in outs]
        q_full[list(idx)] = page_expected_clicks(world, replay.interests[list(idx)], pages)
    q_served = page_expected_clicks(world, replay.interests, replay.pages)
    return q_served, q_full


if __name__ == "__main__":
    sys.exit(main())
