"""Consistency of recycle_router under concurrency, against a real tritonserver and redis-server.

Clients in the loop (gRPC), each user's requests carrying the feedback of the page the client
last saw (viewed and clicked items, its page_token) on a monotone simulated clock:

  * bursts   users x bursts of simultaneous requests of one user, all carrying the same feedback
  * load     sessions of many users at once, each request sent when the previous one is answered
             (no think time), then the same with a think time

and checks, per user:

  * shared_cached_items  items that two recycled answers of one burst (in flight together) share:
                         the same cached state must never serve two pages
  * viewed_again         items the client had reported viewed (in a request answered before this
                         one was sent, or in this one) that come back, by any strategy
  * failed               requests answered with an error

Writes report.json in --out and prints one line per phase.

    python -m perf.router_consistency --seconds 40 --out runs/router_consistency
    (starts redis-server and tritonserver on a copy of --repository, with router params that
    make recycling pay: cheap strategy 3, small λ)
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from client.triton_client import CascadeClient, ServingError
from comrecycle.repository import DEFAULT_REPOSITORY
from comrecycle.specs import ROUTER, router_request

REPO_ROOT = Path(__file__).resolve().parents[1]
# cheap recycling, tiny λ: every repeat with a cached list recycles (the hardest case for consistency)
FORCING_PARAMS = {"lambda": 1e-3, "costs": [1.0, 0.9, 0.8, 0.05], "omega": 0.0, "estimator_cost": 0.02,
                  "budget": 0.01}
N_VIEW = 6  # items of each page the simulated user views (the first ones)


@dataclass
class PhaseReport:
    phase: str
    seconds: float = 0.0
    requests: int = 0
    failed: int = 0
    recycled: int = 0
    viewed_again: int = 0
    shared_cached_items: int = 0
    first_errors: list = field(default_factory=list)

    def line(self) -> str:
        return (f"{self.phase}: {self.requests} requests in {self.seconds:.1f}s, {self.recycled} recycled; "
                f"failed {self.failed}, viewed items served again {self.viewed_again}, items shared by "
                f"recycled answers in flight together {self.shared_cached_items}")


class _User:
    """One simulated user: its session state as the client knows it."""

    def __init__(self, uid: int, t0: float):
        self.uid, self.t = uid, t0
        self.viewed, self.clicked, self.token = [], [], None
        self.history = [3, 5]
        self.reported: set[int] = set()  # every item reported viewed so far in the session
        self.first = True

    def request(self) -> dict[str, np.ndarray]:
        self.t += 7.0
        return router_request(self.uid, [0, 1, 2], self.history, self.viewed, self.clicked, request_time=self.t,
                              new_session=self.first, page_token=None if self.first else self.token)

    def saw(self, out: dict[str, np.ndarray]) -> None:
        """The client shows this page: the user views its first N_VIEW items, clicks the first."""
        page = out["page_items"]
        self.viewed = [int(x) for x in page[:N_VIEW]]
        self.clicked = self.viewed[:1]
        self.token = int(out["page_token"][0]) if "page_token" in out else None  # (servers without it)
        self.reported |= set(self.viewed)
        if self.viewed:
            self.history = ([self.viewed[0]] + self.history)[:50]
        self.first = False


async def _one(c: CascadeClient, r: dict, rep: PhaseReport):
    rep.requests += 1
    try:
        return await c.infer(ROUTER, r)
    except ServingError as e:
        rep.failed += 1
        if len(rep.first_errors) < 5:
            rep.first_errors.append(str(e))
        return None


def _check(out, known_viewed: set[int], rep: PhaseReport) -> None:
    if out is None:
        return
    rep.recycled += int(out["strategy"][0]) > 0
    rep.viewed_again += len(known_viewed & set(out["page_items"].tolist()))


async def bursts(c: CascadeClient, users: list[int], n_bursts: int, size: int) -> PhaseReport:
    rep = PhaseReport(f"bursts ({len(users)} users x {n_bursts} bursts of {size})")
    t0 = time.perf_counter()

    async def run(uid: int):
        u = _User(uid, 0.0)
        u.saw(await _one(c, u.request(), rep) or {"page_items": np.zeros(0, np.int64),
                                                  "page_token": np.zeros(1, np.int64)})
        for _ in range(n_bursts):
            reqs = []
            for _ in range(size):
                reqs.append(u.request())
                u.t -= 7.0  # the same moment for the whole burst
            u.t += 7.0
            outs = await asyncio.gather(*[_one(c, r, rep) for r in reqs])
            for out in outs:
                _check(out, u.reported, rep)
            recycled = [set(o["page_items"].tolist()) for o in outs if o is not None and int(o["strategy"][0]) > 0]
            for a, b in itertools.combinations(recycled, 2):
                rep.shared_cached_items += len(a & b)
            shown = next((o for o in outs if o is not None), None)
            if shown is not None:
                u.saw(shown)

    await asyncio.gather(*[run(uid) for uid in users])
    rep.seconds = time.perf_counter() - t0
    return rep


async def sessions(c: CascadeClient, users: list[int], seconds: float, think_s: tuple[float, float],
                   seed: int) -> PhaseReport:
    name = "no think time" if think_s[1] <= 0 else f"think time {think_s[0] * 1e3:.0f}-{think_s[1] * 1e3:.0f} ms"
    rep = PhaseReport(f"session load ({len(users)} users, {name})")
    rng = random.Random(seed)
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()

    async def run(uid: int):
        u = _User(uid, 0.0)
        while time.perf_counter() < deadline:
            if not u.first and rng.random() < 0.1:  # a new session now and then
                u.first, u.viewed, u.clicked, u.token, u.reported = True, [], [], None, set()
            r = u.request()
            known = u.reported | set(u.viewed)
            out = await _one(c, r, rep)
            _check(out, known, rep)
            if out is not None:
                u.saw(out)
            if think_s[1] > 0:
                await asyncio.sleep(rng.uniform(*think_s))

    await asyncio.gather(*[run(uid) for uid in users])
    rep.seconds = time.perf_counter() - t0
    return rep


async def run_suite(url: str, seconds: float = 40.0, users: int = 32, burst_users: int = 12, n_bursts: int = 20,
                    burst_size: int = 8, seed: int = 0) -> list[PhaseReport]:
    """The three phases against a server at `url` (gRPC); the session phases share `seconds`."""
    async with CascadeClient(url, "grpc", timeout_s=60.0) as c:
        await c.check(ROUTER)
        base = 10_000_000 + seed * 100_000  # user ids of their own: no entries from other runs
        out = [await bursts(c, list(range(base, base + burst_users)), n_bursts, burst_size)]
        load = list(range(base + 1000, base + 1000 + users))
        out.append(await sessions(c, load, seconds / 2, (0.0, 0.0), seed))
        load = list(range(base + 2000, base + 2000 + users))
        out.append(await sessions(c, load, seconds / 2, (0.02, 0.1), seed + 1))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.router_consistency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", default=str(DEFAULT_REPOSITORY["cpu"]),
                    help="model repository with the stages and an estimator installed (copied)")
    ap.add_argument("--seconds", type=float, default=40.0, help="length of the two session-load phases together")
    ap.add_argument("--users", type=int, default=32, help="users of the session-load phases")
    ap.add_argument("--out", default=str(REPO_ROOT / "runs" / "router_consistency"))
    a = ap.parse_args(argv)
    from comrecycle.repository import install_router_params, repository_server
    from comrecycle.serving.redis_server import RedisServer

    with tempfile.TemporaryDirectory(prefix="comrecycle-consistency-") as tmp:
        repo = Path(tmp) / "repo"
        shutil.copytree(a.repository, repo)
        params = Path(tmp) / "params.json"
        params.write_text(json.dumps(FORCING_PARAMS))
        install_router_params(repo, params)
        with RedisServer() as redis_srv, repository_server(
                repo, startup_timeout=300, env={"COMRECYCLE_REDIS_URL": redis_srv.url,
                                                "COMRECYCLE_ROUTER_MAX_INFLIGHT_BATCHES": "4"}) as srv:
            reports = asyncio.run(run_suite(srv.grpc_url, a.seconds, a.users))
    for r in reports:
        print(r.line())
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps([asdict(r) for r in reports], indent=2))
    bad = sum(r.failed + r.viewed_again + r.shared_cached_items for r in reports)
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
