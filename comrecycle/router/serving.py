"""recycle_router on Triton: building the router from the model config, and its metrics.

Settings: comrecycle.settings.RouterSettings (config.pbtxt `parameters`, each overridden by its
COMRECYCLE_* environment variable of tritonserver; `python -c "from comrecycle.settings import
RouterSettings as R; print(R.environment())"` lists them). The decision parameters come from
`params.json` in the version directory (see params.py); the cache entries carry a fingerprint
of the stage models in the repository, so entries written by other model versions are treated
as absent.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
from pathlib import Path

from ..specs import STAGES, STRATEGIES
from .cache import RedisStageCache, redact_url
from .core import PHASES, RecycleRouter
from ..settings import RouterSettings
from .params import PARAMS_FILE, RouterParams
from ..errors import UserError

log = logging.getLogger("comrecycle.router")

# any stage may run in the router's process; a served model (an ensemble suffix) runs there when
# every stage of its chain does, and goes to Triton (BLS) otherwise
LOCAL_STAGES_ALLOWED = STAGES
LATENCY_BUCKETS_S = [0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0]


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


def settings_from_args(args: dict, env=None) -> RouterSettings:
    """The settings of a router model instance, from Triton's initialize() args (and the environment)."""
    cfg = json.loads(args["model_config"])
    return RouterSettings.resolve({k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}, env)


def build_router(args: dict, backend, settings: RouterSettings | None = None) -> RecycleRouter:
    """The router of one model instance, from Triton's initialize() args (and its settings, when
    the caller has resolved them already)."""
    s = settings if settings is not None else settings_from_args(args)
    model_dir = Path(args["model_repository"])
    router_params = RouterParams.load(model_dir / args["model_version"] / PARAMS_FILE)
    session_ttl = s.effective_session_ttl_s
    cache = RedisStageCache(s.redis_url, ttl_s=session_ttl, lock_ms=s.lock_ms, timeout_s=s.redis_timeout_ms / 1e3,
                            retry_after_s=s.retry_after_s, password=s.redis_password or None)
    fingerprint = FingerprintWatch(model_dir.parent, every_s=s.fingerprint_check_s)
    local = s.local_stage_names()
    estimator = (local_estimator_runtime(model_dir.parent, router_params.estimator_version)
                 if s.local_estimator and router_params.uses_estimator else None)
    if local or estimator is not None:
        backend = LocalStagesBackend(backend, local_stage_runtimes(model_dir.parent, local) if local else {},
                                     estimator=estimator)
        log.info("recycle_router v%s runs %s in-process (stages: the latest installed version)", args["model_version"],
                 ", ".join(local + ([f"estimator v{estimator[0]}"] if estimator is not None else [])))
    log.info("recycle_router v%s: λ=%.4g ω=%g costs=%s estimator v%s, model set %s, Redis %s (reachable: %s)",
             args["model_version"], router_params.lam, router_params.omega, router_params.costs,
             router_params.estimator_version, fingerprint.value, redact_url(s.redis_url), cache.ping())
    return RecycleRouter(cache, backend, router_params, fingerprint, ttl_s=s.cache_ttl_s,
                         session_ttl_s=session_ttl, request_time_window_s=s.request_time_window_s)


def local_stage_runtimes(repo: str | Path, stages: list[str]):
    """In-process runtimes of `stages` from the repository: the latest installed version of
    each, with the sizes and settings of its Triton config (the same StageModel code)."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from ..serving.layout import installed_versions
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


def local_estimator_runtime(repo: str | Path, version: int = -1):
    """(version, EstimatorRuntime) of the estimator the params pin (-1: the latest installed),
    from the repository's `estimator/<version>/model.onnx`; None (calls go by BLS) when that
    version is not installed."""
    from ..runtime.estimator_onnx import EstimatorRuntime
    from ..serving.layout import installed_versions

    root = Path(repo) / "estimator"
    versions = installed_versions(root, "model.onnx")
    v = versions[-1] if version == -1 and versions else version
    if v not in versions:
        log.warning("estimator v%s is not installed under %s: the router calls it through Triton", version, root)
        return None
    return v, EstimatorRuntime(root / str(v) / "model.onnx")


class LocalStagesBackend:
    """Calls of models whose every stage is local run in this process (onnxruntime, the same
    StageRuntime code as the Triton models); everything else goes to the wrapped backend (BLS).

    A one-stage call (the re-rank of strategy 3, a fraction of a millisecond) runs on the event
    loop. Longer chains (the full cascade and the suffixes) run in a worker thread
    (onnxruntime releases the GIL), so the batch's recycled groups are served and answered
    while they run, as with BLS."""

    def __init__(self, remote, runtimes: dict, threads: int = 2, estimator=None):
        """estimator: (version, EstimatorRuntime) run here for calls of that version (or -1);
        None: the estimator goes to the wrapped backend."""
        from concurrent.futures import ThreadPoolExecutor

        from .inprocess import CHAINS, InProcessBackend

        self.estimator_version = estimator[0] if estimator is not None else None
        self.remote = remote
        self.local = InProcessBackend(runtimes, estimator[1] if estimator is not None else None)
        self.chains = {model: stages for model, (stages, _) in CHAINS.items() if set(stages) <= set(runtimes)}
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="comrecycle-stages") \
            if any(len(st) > 1 for st in self.chains.values()) else None

    async def infer(self, model, inputs, outputs, version=-1):
        if model == "estimator" and self.estimator_version is not None and version in (-1, self.estimator_version):
            return self.local.run(model, inputs, outputs)  # one small ONNX call: on the event loop
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
