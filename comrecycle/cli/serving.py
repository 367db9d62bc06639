"""`comrecycle serve | install-estimator | install-params | replay | perf | demo`: the model
repository on a real tritonserver (and redis-server), and the clients that drive it."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..errors import UserError
from ..repository import DEFAULT_REPOSITORY, REPO_ROOT
from .common import CliError

log = logging.getLogger("comrecycle")


# ---- serve / replay / perf / demo ---------------------------------------------------------------
def _check_repository(repo: Path) -> dict:
    mpath = repo / "manifest.json"
    if not mpath.exists():
        raise CliError(f"{repo} has no installed model set (no manifest.json): run "
                       f"`python build_models.py` first")
    return json.loads(mpath.read_text())


def cmd_serve(a) -> int:
    import contextlib
    import os

    from ..repository import load_plan
    from ..serving.server_cli import main as server_main

    repo = Path(a.repository)
    _check_repository(repo)
    args = ["--model-repository", str(repo), "--http-port", str(a.http_port), "--grpc-port", str(a.grpc_port),
            "--metrics-port", str(a.metrics_port), "--model-control", "explicit"]
    models, skipped = load_plan(repo)
    for m in models:
        args += ["--load-model", m]
    for name, reason in skipped.items():
        log.warning("not loading %s: %s", name, reason)
    with contextlib.ExitStack() as stack:
        if a.with_redis:
            from ..serving.redis_server import RedisServer, RedisStartError

            try:
                redis_srv = stack.enter_context(RedisServer(a.redis_port or None, maxmemory=a.redis_maxmemory))
            except RedisStartError as e:
                raise CliError(f"--with-redis: {e}") from None
            os.environ["COMRECYCLE_REDIS_URL"] = redis_srv.url  # inherited by tritonserver and the router
            log.info("redis-server %s on %s (memory only; stopped with the server)", redis_srv.pid, redis_srv.url)
        elif "recycle_router" in models:
            log.info("recycle_router will use Redis at %s (COMRECYCLE_REDIS_URL; --with-redis starts one)",
                     os.environ.get("COMRECYCLE_REDIS_URL", "redis://127.0.0.1:6379/0"))
        return server_main(args)


def cmd_install_estimator(a) -> int:
    from ..repository import install_estimator
    from .common import refuse_to_serve_true_q

    refuse_to_serve_true_q(a.estimator)
    dst = install_estimator(a.repository, a.estimator, version=a.version)
    print(f"installed {a.estimator} as {dst} (estimator version {dst.name})")
    print("a running server (explicit model control) loads it with: curl -X POST "
          "localhost:8000/v2/repository/models/estimator/load; `comrecycle serve` loads the latest version")
    return 0


def cmd_install_params(a) -> int:
    from ..repository import install_router_params

    dst = install_router_params(a.repository, a.params, estimator_version=a.estimator_version, version=a.version)
    est = json.loads((dst / "params.json").read_text())["estimator_model_version"]
    print(f"installed {a.params} as {dst} (recycle_router version {dst.name}, calling estimator version {est})")
    print("a running server (explicit model control) switches to it with: curl -X POST "
          "localhost:8000/v2/repository/models/recycle_router/load (no downtime)")
    return 0


def cmd_replay(a) -> int:
    from client.replay import main as replay_main

    args = ["--url", a.url, "--protocol", a.protocol, "--repository", a.repository, "--requests",
            str(a.requests), "--concurrency", str(a.concurrency), "--seed", str(a.seed), "--model", a.model]
    if a.json:
        args += ["--json", a.json]
    return replay_main(args, prog="comrecycle replay")


def cmd_perf(a) -> int:
    from perf.cascade_perf import main as perf_main

    return perf_main(a.rest)


def cmd_demo(a) -> int:
    from ..demo import run_demo

    if a.requests < 1 or a.concurrency < 1:
        raise CliError(f"--requests and --concurrency must be >= 1, got {a.requests}, {a.concurrency}")
    if not 0 < a.budget < 1:
        raise CliError(f"--budget is a relative loss in (0, 1), e.g. 0.01 for 1%; got {a.budget}")
    if a.max_pages < 0:
        raise CliError(f"--max-pages must be >= 0 (0 = no depth guard), got {a.max_pages}")
    if not 0.5 <= a.confidence < 1:  # before minutes of simulation, not when `solve` gets it
        raise CliError(f"--confidence: expected a level in [0.5, 1) (0.95 = a 95% upper bound), got {a.confidence:g}")
    if a.train_requests < 1000 or a.certify_requests < 1000:
        raise CliError(f"--train-requests and --certify-requests: expected at least 1000 requests each, got "
                       f"{a.train_requests}, {a.certify_requests}")
    if isinstance(a.certify_arm_weights, str):  # checked here, before minutes of simulation
        from ..policy.deploy import certify_arm_shares

        try:
            weights = tuple(float(x) for x in a.certify_arm_weights.split(","))
        except ValueError:
            raise CliError("--certify-arm-weights: expected 4 comma-separated positive numbers W0,W1,W2,W3 "
                           f"(strategies 0..3), got {a.certify_arm_weights!r}") from None
        try:
            certify_arm_shares(weights, name="--certify-arm-weights")
        except UserError as e:
            raise CliError(str(e)) from None
        a.certify_arm_weights = weights
    return run_demo(a)

def add_parsers(sub) -> None:
    """The serving commands' parsers."""
    from ..policy.deploy import (DEFAULT_CERTIFY_ARM_WEIGHTS, DEFAULT_CERTIFY_REQUESTS, DEFAULT_CONFIDENCE,
                                 DEFAULT_TRAIN_REQUESTS)

    s = sub.add_parser("serve", help="run the embedded tritonserver in the foreground")
    s.add_argument("--repository", default=str(DEFAULT_REPOSITORY["cpu"]))
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--with-redis", action="store_true",
                   help="also start a loopback redis-server (memory only) for recycle_router's cache, stopped "
                        "with the server; otherwise the router uses $COMRECYCLE_REDIS_URL "
                        "(default redis://127.0.0.1:6379/0)")
    s.add_argument("--redis-port", type=int, default=0, help="--with-redis: its port (0 = a free one, printed)")
    s.add_argument("--redis-maxmemory", default="256mb", help="--with-redis: maxmemory (allkeys-lru eviction)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("install-estimator", help="install a trained estimator as a new version of `estimator`")
    s.add_argument("--estimator", required=True, help="directory written by `comrecycle train-estimator --out`")
    s.add_argument("--repository", default=str(DEFAULT_REPOSITORY["cpu"]))
    s.add_argument("--version", type=int, help="version number (default: the highest installed + 1)")
    s.set_defaults(func=cmd_install_estimator)

    s = sub.add_parser("install-params", help="install router params (`comrecycle solve`) as a new version of "
                                              "recycle_router")
    s.add_argument("--params", required=True, help="params JSON written by `comrecycle solve --out`")
    s.add_argument("--repository", default=str(DEFAULT_REPOSITORY["cpu"]))
    s.add_argument("--estimator-version", type=int,
                   help="estimator version the router calls (default: the latest installed)")
    s.add_argument("--version", type=int, help="version number (default: the highest installed + 1)")
    s.set_defaults(func=cmd_install_params)

    s = sub.add_parser("replay", help="replay simulated sessions against a running server")
    s.add_argument("--url", default="127.0.0.1:8001", help="host:port of the server's gRPC (or HTTP) port")
    s.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    s.add_argument("--repository", default=str(DEFAULT_REPOSITORY["cpu"]),
                   help="the served model repository (its manifest names the simulated world)")
    s.add_argument("--requests", type=int, default=2000, help="requests to replay")
    s.add_argument("--concurrency", type=int, default=16, help="concurrent simulated sessions")
    s.add_argument("--seed", type=int, default=1, help="simulator seed")
    s.add_argument("--model", default="cascade",
                   help="cascade (full cascade for every request) or recycle_router (feedback, request_time and "
                        "new_session sent as the main job does; prints the strategy mix)")
    s.add_argument("--json", help="also write the report (JSON) here")
    s.set_defaults(func=cmd_replay)

    s = sub.add_parser("perf", help="perf_analyzer on cascade + floor (options after --; try -- --help)")
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_perf)

    s = sub.add_parser("demo", help="the main job: build models if needed, serve, replay, report")
    s.add_argument("--profile", default="default")
    s.add_argument("--models", help="model set directory (default artifacts/models/PROFILE)")
    s.add_argument("--repository", default=str(DEFAULT_REPOSITORY["cpu"]))
    s.add_argument("--requests", type=int, default=4000, help="requests replayed per path (router, always-full)")
    s.add_argument("--concurrency", type=int, default=16, help="concurrent simulated sessions")
    s.add_argument("--budget", type=float, default=0.01, help="relative effect-loss budget b (0.01 = 1%%)")
    s.add_argument("--max-pages", type=int, default=0, metavar="M",
                   help="depth guard: a cached list serves at most M pages (0 = off, the default; see README, "
                        "'The policy')")
    s.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE,
                   help="solve --confidence: the level of the off-policy bound that meets the budget (default "
                        "%(default)s; 0.5 = the point estimate)")
    s.add_argument("--train-requests", type=int, default=DEFAULT_TRAIN_REQUESTS,
                   help="size of the randomised log the estimator is trained on (first run only; cached; "
                        "default %(default)s)")
    s.add_argument("--certify-requests", type=int, default=DEFAULT_CERTIFY_REQUESTS,
                   help="size of the second randomised log λ is certified on (first run only; cached; "
                        "default %(default)s)")
    s.add_argument("--certify-arm-weights", metavar="W0,W1,W2,W3",
                   default=",".join(f"{w:g}" for w in DEFAULT_CERTIFY_ARM_WEIGHTS),
                   help="positive relative weights of strategies 0..3 in the certification log, "
                        "renormalised among the strategies whose cache is available; each needs a share of "
                        "at least 0.01 (default %(default)s: the full cascade or strategy 3 mostly, so that a "
                        "'full or strategy 3' rule gets a narrower bound than from a uniform log; 1,1,1,1 = "
                        "uniform). "
                        "The log is cached per weights (artifacts/router/KEY/certify_N_wSHARES.parquet): "
                        "new weights simulate a new one")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default=str(REPO_ROOT / "runs" / "demo"))
    s.set_defaults(func=cmd_demo)
