"""recycle_router on Triton: building the router from the model config, and its metrics.

Configuration (config.pbtxt `parameters`, overridden by the environment of tritonserver):
  redis_url        COMRECYCLE_REDIS_URL       redis://127.0.0.1:6379/0 (rediss:// for TLS)
  redis password   COMRECYCLE_REDIS_PASSWORD  (or in the URL)
  cache_ttl_s      COMRECYCLE_CACHE_TTL_S     900: a cached stage list older than this is not recycled
  session_ttl_s    COMRECYCLE_SESSION_TTL_S   3900: session state (exposed items, pages); the key's TTL
  redis_timeout_ms COMRECYCLE_REDIS_TIMEOUT_MS 50: slower than this = Redis down for the batch
  lock_ms          COMRECYCLE_LOCK_MS          2000: a user's lock expires if a router dies
  retry_after_s    COMRECYCLE_REDIS_RETRY_S    1.0: after a failure, Redis is left alone this long
  local_stages     COMRECYCLE_ROUTER_LOCAL_STAGES all: stages run in the router's process (a list such as
                   "rank,rerank", "all", or "none": every stage through Triton, by BLS)
  metrics_flush_s  COMRECYCLE_ROUTER_METRICS_FLUSH_S 0.5: the custom metrics are sent to Triton this
                   often by a background thread (0: after every batch, on the serving thread)
  max_inflight_batches COMRECYCLE_ROUTER_MAX_INFLIGHT_BATCHES 1: batches one instance serves at
                   once (> 1: execute returns at once and the batches overlap; router/runner.py)
The decision parameters come from `params.json` in the version directory (see params.py); the
cache entries carry a fingerprint of the model set in the repository manifest, so entries
written by other model versions are treated as absent.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np

from ..specs import STAGES, STRATEGIES
from .cache import RedisStageCache, redact_url
from .core import CACHE_TTL_S, PHASES, SESSION_TTL_S, RecycleRouter
from .params import PARAMS_FILE, RouterParams
from ..errors import UserError

log = logging.getLogger("comrecycle.router")

SETTINGS = {  # parameter -> (environment variable, default)
    "redis_url": ("COMRECYCLE_REDIS_URL", "redis://127.0.0.1:6379/0"),
    "redis_password": ("COMRECYCLE_REDIS_PASSWORD", ""),
    "cache_ttl_s": ("COMRECYCLE_CACHE_TTL_S", str(CACHE_TTL_S)),
    "session_ttl_s": ("COMRECYCLE_SESSION_TTL_S", str(SESSION_TTL_S)),
    "redis_timeout_ms": ("COMRECYCLE_REDIS_TIMEOUT_MS", "50"),
    "lock_ms": ("COMRECYCLE_LOCK_MS", "2000"),  # extended every lock_ms/3 while a batch runs
    # > 0: a request_time further than this (s) from the server clock is INVALID_ARG. 0 (default):
    # not checked, for clients on a simulated clock (replays); set it where clients send Unix time
    "request_time_window_s": ("COMRECYCLE_REQUEST_TIME_WINDOW_S", "0"),
    # how often the stage models' fingerprint (latest version + content of each stage) is checked
    "fingerprint_check_s": ("COMRECYCLE_FINGERPRINT_CHECK_S", "5"),
    "retry_after_s": ("COMRECYCLE_REDIS_RETRY_S", "1.0"),
    # stages the router runs in its own process instead of a BLS call (comma-separated, "all"
    # or "none"). Every BLS call is a round trip to Triton plus one inter-process hop per stage
    # of the ensemble; on a 2-core machine those hops cost more CPU than the CPU stages
    # themselves. In-process, a strategy-3 request is a re-rank on the router's own thread and
    # an initial request costs what calling `cascade` directly costs (docs/RESULTS.md).
    # "none" (BLS only) is for stages on a GPU, served by Triton.
    "local_stages": ("COMRECYCLE_ROUTER_LOCAL_STAGES", "all"),
    # every pb_utils metric update is an inter-process round trip (~65-80 us measured here),
    # ~13 per batch: they were 10% of a router instance's busy time under load. Counters are
    # summed locally and histogram observations queued, then sent by a background thread.
    "metrics_flush_s": ("COMRECYCLE_ROUTER_METRICS_FLUSH_S", "0.5"),
    # batches one router instance serves at once. 1: execute() runs its batch to the end, and
    # requests queue in Triton meanwhile (larger batches: the most throughput at saturation).
    # > 1 (router/runner.py): execute() hands the batch to the instance's event loop and
    # returns, so a batch waiting on a full cascade does not hold the instance: lower latency
    # at moderate load, but smaller batches cost throughput at saturation (docs/RESULTS.md)
    "max_inflight_batches": ("COMRECYCLE_ROUTER_MAX_INFLIGHT_BATCHES", "1"),
}
# any stage may run in the router's process; a served model (an ensemble suffix) runs there when
# every stage of its chain does, and goes to Triton (BLS) otherwise
LOCAL_STAGES_ALLOWED = STAGES
LATENCY_BUCKETS_S = [0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0]


def settings(config_params: dict[str, str], env=None) -> dict[str, str]:
    env = os.environ if env is None else env
    return {k: env.get(var) or config_params.get(k) or default for k, (var, default) in SETTINGS.items()}


def max_inflight_batches(s: dict[str, str]) -> int:
    """The `max_inflight_batches` setting as an integer >= 1 (ValueError naming it otherwise)."""
    raw = s["max_inflight_batches"]
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"max_inflight_batches (COMRECYCLE_ROUTER_MAX_INFLIGHT_BATCHES): expected an "
                         f"integer >= 1, got {raw!r}")
    return n


def _stage_files(repo: Path) -> list[tuple[str, int, Path | None]]:
    """(stage, latest installed version or 0, its model.onnx or None) per stage of a repository."""
    out = []
    for stage in STAGES:
        root = repo / stage
        versions = sorted(int(v.name) for v in root.iterdir() if v.is_dir() and v.name.isdigit()
                          and (v / "model.onnx").is_file()) if root.is_dir() else []
        out.append((stage, versions[-1], root / str(versions[-1]) / "model.onnx") if versions else (stage, 0, None))
    return out


_DIGESTS: dict[tuple, bytes] = {}  # (path, size, mtime_ns) -> sha256 of the file: hash each file once


def _digest(path: Path) -> bytes:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.digest()
    return _DIGESTS[key]


def model_set_fingerprint(repo: str | Path) -> str:
    """16 hex digits naming the stage models a repository serves: each stage's latest installed
    version and the content (sha256) of its model.onnx. Cache entries written under another
    fingerprint keep their session but not their lists (stale_version)."""
    h = hashlib.sha256()
    for stage, version, path in _stage_files(Path(repo)):
        h.update(f"{stage}:{version}:".encode())
        h.update(_digest(path) if path is not None else b"none")
    return h.hexdigest()[:16]


class FingerprintWatch:
    """The repository's stage-model fingerprint, checked again at most every `every_s` seconds
    (a stat of the version dirs; a file is hashed again only when it changed): a stage reloaded
    with a new version changes the fingerprint without reloading the router."""

    def __init__(self, repo: str | Path, every_s: float = 5.0, clock=None):
        import time

        self.repo, self.every_s, self.clock = Path(repo), float(every_s), clock or time.monotonic
        self.value = model_set_fingerprint(self.repo)
        self._next = self.clock() + self.every_s

    def __call__(self) -> str:
        now = self.clock()
        if now >= self._next:
            self._next = now + self.every_s
            try:
                new = model_set_fingerprint(self.repo)
            except OSError as exc:  # a version dir replaced while we look: keep the last value
                log.debug("fingerprint not refreshed: %s", exc)
                return self.value
            if new != self.value:
                log.info("stage models changed (fingerprint %s -> %s): older cache entries keep their "
                         "session but not their lists", self.value, new)
                self.value = new
        return self.value


def settings_from_args(args: dict) -> dict[str, str]:
    """The settings of a router model instance, from Triton's initialize() args."""
    cfg = json.loads(args["model_config"])
    return settings({k: v["string_value"] for k, v in cfg.get("parameters", {}).items()})


def build_router(args: dict, backend) -> RecycleRouter:
    """The router of one model instance, from Triton's initialize() args."""
    s = settings_from_args(args)
    model_dir = Path(args["model_repository"])
    router_params = RouterParams.load(model_dir / args["model_version"] / PARAMS_FILE)
    session_ttl = max(float(s["session_ttl_s"]), float(s["cache_ttl_s"]))
    cache = RedisStageCache(s["redis_url"], ttl_s=session_ttl, lock_ms=int(s["lock_ms"]),
                            timeout_s=float(s["redis_timeout_ms"]) / 1e3, retry_after_s=float(s["retry_after_s"]),
                            password=s["redis_password"] or None)
    fingerprint = FingerprintWatch(model_dir.parent, every_s=float(s["fingerprint_check_s"]))
    local = local_stage_names(s["local_stages"])
    if local:
        backend = LocalStagesBackend(backend, local_stage_runtimes(model_dir.parent, local))
        log.info("recycle_router v%s runs %s in-process (the latest installed version)", args["model_version"],
                 ", ".join(local))
    log.info("recycle_router v%s: λ=%.4g ω=%g costs=%s estimator v%s, model set %s, Redis %s (reachable: %s)",
             args["model_version"], router_params.lam, router_params.omega, router_params.costs,
             router_params.estimator_version, fingerprint.value, redact_url(s["redis_url"]), cache.ping())
    return RecycleRouter(cache, backend, router_params, fingerprint, ttl_s=float(s["cache_ttl_s"]),
                         session_ttl_s=session_ttl, request_time_window_s=float(s["request_time_window_s"]))


def local_stage_names(setting: str) -> list[str]:
    """The `local_stages` setting as stage names ("all": every stage; "none" or "": none)."""
    names = [x.strip() for x in setting.split(",") if x.strip() and x.strip() != "none"]
    return list(STAGES) if names == ["all"] else names


def local_stage_runtimes(repo: str | Path, stages: list[str]):
    """In-process runtimes of `stages` from the repository: the latest installed version of
    each, with the sizes and settings of its Triton config (the same StageModel code)."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from ..repository import installed_versions
    from ..serving.stage_model import StageModel

    bad = [x for x in stages if x not in LOCAL_STAGES_ALLOWED]
    if bad:
        raise UserError(f"local_stages: expected a subset of {list(LOCAL_STAGES_ALLOWED)}, got {bad}")
    runtimes = {}
    for name in stages:
        root = Path(repo) / name
        versions = installed_versions(root, "model.onnx")
        if not versions:
            raise FileNotFoundError(f"local stage {name}: no installed version with model.onnx under {root}")
        cfg = text_format.Parse((root / "config.pbtxt").read_text(), mc.ModelConfig())
        args = {"model_config": json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True)),
                "model_repository": str(root), "model_version": str(versions[-1])}
        runtimes[name] = StageModel.from_triton_args(args).runtime
    return runtimes


class LocalStagesBackend:
    """Calls of models whose every stage is local run in this process (onnxruntime, the same
    StageRuntime code as the Triton models); everything else goes to the wrapped backend (BLS).

    A one-stage call (the re-rank of strategy 3, a fraction of a millisecond) runs on the event
    loop. Longer chains (the full cascade and the suffixes) run in a worker thread
    (onnxruntime releases the GIL), so the batch's recycled groups are served and answered
    while they run, as with BLS."""

    def __init__(self, remote, runtimes: dict, threads: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        from .inprocess import CHAINS, InProcessBackend

        self.remote, self.local = remote, InProcessBackend(runtimes)
        self.chains = {model: stages for model, (stages, _) in CHAINS.items() if set(stages) <= set(runtimes)}
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="comrecycle-stages") \
            if any(len(st) > 1 for st in self.chains.values()) else None

    async def infer(self, model, inputs, outputs, version=-1):
        stages = self.chains.get(model)
        if stages is None:
            return await self.remote.infer(model, inputs, outputs, version)
        if len(stages) == 1:
            return self.local.run(model, inputs, outputs)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.local.run, model, inputs, outputs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


class RouterMetrics:
    """Custom Prometheus metrics on Triton's /metrics endpoint (pb_utils.MetricFamily).

    record() only adds to local sums and queues histogram observations; they reach Triton every
    `flush_s` seconds from a background thread (so /metrics lags by at most ~flush_s), or at
    once after every batch when flush_s is 0. close() sends what is pending."""

    def __init__(self, pb_utils, model: str, version: str, flush_s: float = 0.5):
        MF = pb_utils.MetricFamily
        labels = {"model": model, "version": str(version)}
        self._families = [
            MF("comrecycle_router_requests_total", "requests served, by strategy", MF.COUNTER),
            MF("comrecycle_cache_lookups_total", "cache claims by result (hit, miss, busy, corrupt, error, "
               "stale_version, expired, new_session)", MF.COUNTER),
            MF("comrecycle_compute_units_total", "compute units (1 = one full cascade): spent by the router "
               "(stages + estimator), and what always-full would have spent on the same requests", MF.COUNTER),
            MF("comrecycle_compute_saved_ratio", "1 - spent / always-full since this model instance started",
               MF.GAUGE),
            MF("comrecycle_router_events_total", "invalid requests, failed requests, estimator failures, "
               "fallbacks to strategy 0, failed cache writes, write-backs skipped for a lost lock, keys "
               "repaired (wrong type, oversize), request times clamped to the user's last one, feedback "
               "parked by busy requests", MF.COUNTER),
            MF("comrecycle_router_latency_seconds", "time from the start of the router batch to the "
               "request's answer, by strategy", MF.HISTOGRAM),
            MF("comrecycle_router_phase_seconds", "wall time of each phase of a router batch: parse (input "
               "checks), claim (Redis read + lock, request filter), decide (estimator call + scores), stages "
               "(the BLS calls of the strategy groups), commit (Redis write-back)", MF.HISTOGRAM),
        ]
        req, cache, compute, saved, events, latency, phases = self._families
        self.requests = {j: req.Metric(labels={**labels, "strategy": str(j)}) for j in STRATEGIES}
        self.cache = {k: cache.Metric(labels={**labels, "result": k}) for k in
                      ("hit", "miss", "busy", "corrupt", "error", "stale_version", "expired", "new_session")}
        self.compute = {k: compute.Metric(labels={**labels, "kind": k}) for k in ("spent", "always_full")}
        self.saved_ratio = saved.Metric(labels=labels)
        self._spent = self._full = 0.0
        self.events = {k: events.Metric(labels={**labels, "event": k}) for k in
                       ("invalid", "failed", "estimator_failure", "fallback", "cache_write_failure", "lost_write",
                        "repaired", "time_clamped", "parked_feedback", "feedback_mismatch", "feedback_dropped")}
        self.latency = {j: latency.Metric(labels={**labels, "strategy": str(j)}, buckets=LATENCY_BUCKETS_S)
                        for j in STRATEGIES}
        self.phases = {k: phases.Metric(labels={**labels, "phase": k}, buckets=LATENCY_BUCKETS_S) for k in PHASES}
        self.flush_s = float(flush_s)
        self._mutex = threading.Lock()
        self._sums: dict = {}  # counter metric -> increment not yet sent
        self._observed: list = []  # (histogram metric, value) not yet sent
        self._ratio_changed = False
        self._stop = threading.Event()
        self._thread = None
        if self.flush_s > 0:
            self._thread = threading.Thread(target=self._flush_loop, name="comrecycle-metrics", daemon=True)
            self._thread.start()

    def record(self, report, latencies) -> None:
        """report: the batch's BatchReport; latencies: (strategy, seconds from the start of the
        batch to the request's answer) per answered request (strategy -1 for errors)."""
        add = []
        add += [(self.requests[j], n) for j, n in enumerate(report.strategies) if n]
        add += [(self.cache[k], n) for k, n in report.cache.items() if n]
        full = report.compute_spent + report.compute_saved
        add += [(self.compute["spent"], report.compute_spent), (self.compute["always_full"], full)]
        add += [(self.events[k], n) for k, n in (
            ("invalid", report.invalid), ("failed", report.failed), ("estimator_failure", report.estimator_failures),
            ("fallback", report.fallbacks), ("cache_write_failure", int(report.cache_write_failed)),
            ("lost_write", report.lost_writes), ("repaired", report.repaired), ("time_clamped", report.time_clamped),
            ("parked_feedback", report.parked_feedback), ("feedback_mismatch", report.feedback_mismatch),
            ("feedback_dropped", report.feedback_dropped)) if n]
        observed = [(self.phases[k], sec) for k, sec in report.phase_seconds.items()]
        observed += [(self.latency[j], sec) for j, sec in latencies if j in self.latency]
        with self._mutex:
            for metric, n in add:
                self._sums[metric] = self._sums.get(metric, 0.0) + float(n)
            self._observed += observed
            self._spent += report.compute_spent
            self._full += full
            self._ratio_changed = True
        if self.flush_s <= 0:
            self.flush()

    def flush(self) -> None:
        """Send the pending sums and observations to Triton (never raises)."""
        with self._mutex:
            sums, observed, self._sums, self._observed = self._sums, self._observed, {}, []
            ratio = 1.0 - self._spent / self._full if self._ratio_changed and self._full > 0 else None
            self._ratio_changed = False
        try:
            for metric, n in sums.items():
                if n:
                    metric.increment(float(n))
            for metric, value in observed:
                metric.observe(float(value))
            if ratio is not None:
                self.saved_ratio.set(ratio)
        except Exception:  # noqa: BLE001 - metrics must never take the router down
            log.exception("could not update the router's metrics")

    def _flush_loop(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush()

    def close(self) -> None:
        """Stop the background thread and send what is pending."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()
