"""Typed settings: the one source of the serving sizes and of recycle_router's run-time settings.

Read by the config generator (repository.py writes them into config.pbtxt), by the runtime (the
router's call sizes, the estimator's chunks) and by the simulator (the cache TTL), so a config
and the code that serves it cannot disagree.

- :data:`SERVING` (:class:`ServingSettings`): batch sizes, instance counts, queue delays, the
  versions kept loaded during a roll-out, the cache TTL.
- :class:`RouterSettings`: what one recycle_router instance runs with. Each field has a
  config.pbtxt parameter of the same name and an environment variable of tritonserver's
  process that overrides it (Kubernetes-style: the image's config, the pod's environment).
  ``RouterSettings.resolve(config_params, env)`` parses and checks them all and names the
  parameter and its variable in every error.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Mapping, Optional

from .errors import UserError
from .specs import STAGES


def _frozen(d: dict) -> Mapping:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class ServingSettings:
    """Sizes and counts of the served models (one instance: :data:`SERVING`)."""

    # Largest batch per stage call. Ranking's target attention is [batch, 300, 50, 4*emb] floats.
    stage_max_batch: Mapping[str, int] = field(default_factory=lambda: _frozen(
        {"retrieval": 32, "prerank": 32, "rank": 16, "rerank": 32}))
    estimator_max_batch: int = 64
    # Stage instances on the CPU model set (the GPU variants run one per GPU).
    stage_instances: Mapping[str, int] = field(default_factory=lambda: _frozen(
        {"retrieval": 1, "prerank": 1, "rank": 2, "rerank": 1}))
    estimator_instances: int = 1
    # A non-decoupled Python model holds its instance until execute returns, i.e. until the
    # slowest strategy group (a full cascade) of the batch is done, even though the answers go
    # out earlier, so the instance count bounds the batches in flight. With the stages in the
    # router's process (local_stages), fewer and hotter processes answer a recycled request
    # faster at low load, and more instances overlap more full cascades under saturation. On
    # 2 cores (docs/RESULTS.md, "Router instances"; medians of 5 rounds, 1 / 2 / 3 / 4 instances):
    # strategy-3 p50 / cascade at concurrency 1: 0.24 / 0.29 / 0.32 / 0.34; throughput of the
    # 74% mix / always-full at 16: 1.47 / 1.64 / 1.60 / 1.57; initial p50 / cascade at 16:
    # 1.34 / 1.12 / 0.97 / 0.94. Two is the only count within every target. The GPU and
    # container variants call their stages by BLS, where four instances were measured better
    # (initial requests at concurrency 16, 1.18x against 1.38x with two; docs/history.md,
    # "Answer first, re-rank in the router, four instances").
    router_instances: Mapping[str, int] = field(default_factory=lambda: _frozen(
        {"cpu": 2, "gpu": 4, "container": 4}))
    queue_delay_us: int = 200
    router_queue_delay_us: int = 100  # short: at low load a batch of one should not wait
    rollout_versions: int = 2  # old and new estimator versions stay loaded while an update rolls out
    cache_ttl_s: float = 900.0  # a cached stage list older than this is not recycled (router and simulator)

    @property
    def ensemble_max_batch(self) -> int:
        """An ensemble (cascade suffix) batches as much as its smallest stage: the router's call size."""
        return min(self.stage_max_batch.values())

    @property
    def router_max_batch(self) -> int:
        """One BLS call per strategy group, so the router batches what an ensemble takes."""
        return self.ensemble_max_batch


SERVING = ServingSettings()


def _setting(default, env: str, doc: str):
    return field(default=default, metadata={"env": env, "doc": doc})


@dataclass(frozen=True)
class RouterSettings:
    """recycle_router's settings: config.pbtxt `parameters`, overridden by the environment."""

    redis_url: str = _setting("redis://127.0.0.1:6379/0", "COMRECYCLE_REDIS_URL",
                              "the cache (rediss:// for TLS; a password may be in the URL)")
    redis_password: str = _setting("", "COMRECYCLE_REDIS_PASSWORD",
                                   "Redis password (environment only: never written into a config)")
    cache_ttl_s: float = _setting(SERVING.cache_ttl_s, "COMRECYCLE_CACHE_TTL_S",
                                  "a cached stage list older than this is not recycled")
    session_ttl_s: float = _setting(3900.0, "COMRECYCLE_SESSION_TTL_S",
                                    "a user silent this long starts a new session; the key's TTL "
                                    "(> the simulator's longest gap, 3600 s)")
    redis_timeout_ms: float = _setting(50.0, "COMRECYCLE_REDIS_TIMEOUT_MS",
                                       "slower than this = Redis down for the batch")
    lock_ms: int = _setting(2000, "COMRECYCLE_LOCK_MS",
                            "a user's lock expires if a router dies (extended every lock_ms/3 while a batch runs)")
    request_time_window_s: float = _setting(
        0.0, "COMRECYCLE_REQUEST_TIME_WINDOW_S",
        "> 0: a request_time further than this from the server clock is INVALID_ARG; 0: not checked "
        "(clients on a simulated clock, replays)")
    fingerprint_check_s: float = _setting(5.0, "COMRECYCLE_FINGERPRINT_CHECK_S",
                                          "how often the stage models' fingerprint is checked")
    retry_after_s: float = _setting(1.0, "COMRECYCLE_REDIS_RETRY_S",
                                    "after a failure, Redis is left alone this long")
    # Every BLS call is a round trip to Triton plus one inter-process hop per stage of the
    # ensemble; on a 2-core machine those hops cost more CPU than the CPU stages themselves.
    local_stages: str = _setting("all", "COMRECYCLE_ROUTER_LOCAL_STAGES",
                                 "stages run in the router's process: a list such as rank,rerank, all, or "
                                 "none (every stage through Triton by BLS: stages on a GPU)")
    # the estimator by BLS costs two inter-process hops and its batcher's queue delay on every
    # repeated request (~2.5 ms of a recycled request's latency on 2 cores); on an H200 the BLS
    # call to the GPU estimator cost 6.9-12.7 ms per router batch against 1.1-1.5 ms in-process
    local_estimator: int = _setting(1, "COMRECYCLE_ROUTER_LOCAL_ESTIMATOR",
                                    "1: the estimator version the params pin runs in the router's process "
                                    "(onnxruntime on its installed model.onnx, on the CPU); 0: through Triton "
                                    "by BLS (the container variant's estimator)")
    # every pb_utils metric update is an inter-process round trip (~65-80 us): summed locally
    # and sent by a background thread
    metrics_flush_s: float = _setting(0.5, "COMRECYCLE_ROUTER_METRICS_FLUSH_S",
                                      "custom metrics are sent to Triton this often (0: after every batch)")
    max_inflight_batches: int = _setting(1, "COMRECYCLE_ROUTER_MAX_INFLIGHT_BATCHES",
                                         "batches one instance serves at once (> 1: execute returns at once "
                                         "and the batches overlap; router/runner.py)")

    def __post_init__(self):
        def bad(name: str, expected: str):
            env = self.environment()[name]
            raise UserError(f"{name} ({env}): expected {expected}, got {getattr(self, name)!r}")

        for name in ("cache_ttl_s", "session_ttl_s", "redis_timeout_ms", "fingerprint_check_s"):
            if not getattr(self, name) > 0:
                bad(name, "a number > 0")
        for name in ("request_time_window_s", "retry_after_s", "metrics_flush_s"):
            if not getattr(self, name) >= 0:
                bad(name, "a number >= 0")
        if self.lock_ms < 1:
            bad("lock_ms", "an integer >= 1")
        if self.local_estimator not in (0, 1):
            bad("local_estimator", "0 or 1")
        if self.max_inflight_batches < 1:
            bad("max_inflight_batches", "an integer >= 1")
        unknown = [s for s in self.local_stage_names() if s not in STAGES]
        if unknown:
            bad("local_stages", f"all, none or a comma-separated subset of {list(STAGES)} (unknown: {unknown})")

    @classmethod
    def environment(cls) -> dict[str, str]:
        """{setting: the environment variable that overrides it}."""
        return {f.name: f.metadata["env"] for f in fields(cls)}

    @classmethod
    def resolve(cls, config_params: Optional[Mapping[str, str]] = None,
                env: Optional[Mapping[str, str]] = None) -> "RouterSettings":
        """The settings from a config's parameters, each overridden by its environment variable
        when set (non-empty); defaults for the rest. A UserError names the setting, its variable
        and what arrived."""
        config_params = config_params or {}
        env = os.environ if env is None else env
        values = {}
        for f in fields(cls):
            raw = env.get(f.metadata["env"]) or config_params.get(f.name)
            if raw is None or raw == "":
                continue
            kind = type(f.default)
            try:
                values[f.name] = kind(raw) if kind is not int else int(str(raw).strip())
            except (TypeError, ValueError):
                raise UserError(f"{f.name} ({f.metadata['env']}): expected {'an integer' if kind is int else 'a number' if kind is float else 'text'}, "
                                f"got {raw!r}") from None
        return cls(**values)

    def config_parameters(self) -> dict[str, str]:
        """The string parameters a config.pbtxt carries (never the password: environment only)."""
        return {f.name: _text(getattr(self, f.name)) for f in fields(self) if f.name != "redis_password"}

    def local_stage_names(self) -> list[str]:
        """`local_stages` as stage names ("all": every stage; "none" or "": none)."""
        names = [x.strip() for x in self.local_stages.split(",") if x.strip() and x.strip() != "none"]
        return list(STAGES) if names == ["all"] else names

    @property
    def effective_session_ttl_s(self) -> float:
        """A session outlives its cached lists: max(session_ttl_s, cache_ttl_s)."""
        return max(self.session_ttl_s, self.cache_ttl_s)


def _text(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)
