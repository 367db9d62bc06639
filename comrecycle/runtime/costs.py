"""Measured per-stage cost and the strategy cost profile c_j (docs/method.md).

Each stage is timed per request at a reference batch size, in-process with onnxruntime on
realistic inputs (real candidate lists produced by the upstream stages). c_j = the cost of
the stages strategy j runs, normalised so that c_0 = 1. Nothing here is typed in by hand.
"""
from __future__ import annotations

import platform
import time

import numpy as np

from ..specs import STAGES, STRATEGIES, STRATEGY_ENTRY_STAGE
from .cascade import InProcessCascade, batched
from ..errors import UserError


def _median_seconds(call, repeats: int, warmup: int) -> float:
    """Median wall time of `call()` over `repeats` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_stage_costs(cascade: InProcessCascade, contexts: list[dict], batch_size: int = 8,
                        repeats: int = 5, warmup: int = 1) -> dict:
    """Median seconds per request of each stage at `batch_size` requests per onnxruntime call."""
    contexts = contexts[:batch_size]
    if len(contexts) < batch_size:
        raise UserError(f"need {batch_size} contexts, got {len(contexts)}")
    full = cascade.run(contexts)
    per_stage = {}
    for si, stage in enumerate(STAGES):
        reqs = []
        for c, out in zip(contexts, full):
            ctx = {k: c[k] for k in ("user_id", "user_features", "history", "request_features")}
            if stage == "retrieval":
                ctx["exclude_items"] = c["exclude_items"]
            else:
                ctx["candidates"] = out[f"{STAGES[si - 1]}_items"]
            reqs.append(batched(ctx))
        per_stage[stage] = _median_seconds(lambda: cascade.stages[stage].run(reqs), repeats, warmup) / batch_size
    return per_stage


def strategy_costs(per_stage: dict[str, float]) -> dict[int, float]:
    total = sum(per_stage.values())
    return {j: sum(per_stage[s] for s in STAGES[STAGES.index(STRATEGY_ENTRY_STAGE[j]):]) / total
            for j in STRATEGIES}


def cost_profile(cascade: InProcessCascade, contexts: list[dict], batch_size: int = 8, repeats: int = 5) -> dict:
    per_stage = measure_stage_costs(cascade, contexts, batch_size=batch_size, repeats=repeats)
    c = strategy_costs(per_stage)
    return {
        "batch_size": batch_size, "repeats": repeats,
        "seconds_per_request": per_stage,
        "share_of_full_cascade": {s: v / sum(per_stage.values()) for s, v in per_stage.items()},
        "strategy_cost": {str(j): c[j] for j in c},
        "strategy_names": {str(j): n for j, n in STRATEGIES.items()},
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "ort_threads": int(next(iter(cascade.stages.values())).session.get_session_options()
                                       .intra_op_num_threads)},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def measure_estimator_seconds(onnx_path, features: dict[str, np.ndarray], batch_size: int = 8,
                              repeats: int = 51, warmup: int = 5) -> float:
    """Median seconds per request of the estimator at `batch_size` requests per onnxruntime
    call (the same reference as the stages), on real rows (`features` from a log). One call
    takes about 2 ms: with 7 timed calls the same graph measured 0.040 and 0.078 of a cascade
    in two runs; 51 calls after 5 warm-up ones take ~0.1 s and keep repeat runs within ~15%."""
    from .estimator_onnx import EstimatorRuntime

    rt = EstimatorRuntime(onnx_path)
    n = min(batch_size, len(features["user_features"]))
    if n == 0:
        raise UserError("need at least one request to time the estimator")
    reqs = []
    for i in range(n):
        h = features["history"][i]
        reqs.append({"user_features": features["user_features"][i:i + 1], "history": h[h >= 0][None],
                     "request_features": features["request_features"][i:i + 1],
                     "cache_state": features["cache_state"][i:i + 1]})
    return _median_seconds(lambda: rt.run(reqs), repeats, warmup) / n
