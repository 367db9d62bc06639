"""The main job (`comrecycle demo`, `bash scripts/demo.sh`).

1. the model set (built if missing, ~6-7 min on 2 cores) installed in the repository;
2. the effect-loss estimator and the router params (built if missing, cached in
   artifacts/router/): a uniformly randomised training log (observed clicks only), the
   estimator trained on it, `solve` certifying λ for the budget on a second such log, and a
   small held-out log with q_j for the frontier; installed as new estimator / recycle_router
   versions;
3. redis-server and tritonserver started on free loopback ports;
4. simulated sessions replayed through recycle_router (client in the feedback loop) and, on
   the same seeds, through the always-full `cascade`;
5. the report: compute saved %, effect loss % (with a session-bootstrap 95% CI), the strategy
   mix, latency p50/p99 per strategy, and the frontier plot of the policy with the replay's
   measured point on it.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from .repository import REPO_ROOT

ROUTER_ARTIFACTS = REPO_ROOT / "artifacts" / "router"
# what the estimator is trained on and what λ is certified on: two uniformly randomised logs of
# other sessions (uniform propensities keep the off-policy interval narrow; the skewed session
# mixture that explores deep caches gives 1/0.02 weights and an interval too wide to use)
ESTIMATOR_OPTIONS = {"max_epochs": 8, "label": "view-adjusted"}
PIPELINE_VERSION = 2  # part of the cache key: artifacts of an earlier pipeline are not reused


def _key(model_dir: Path, train_requests: int, seed: int) -> str:
    m = json.loads((model_dir / "manifest.json").read_text())
    return hashlib.sha256(json.dumps([m.get("built_at"), m.get("seed"), m.get("profile"), train_requests,
                                      seed, PIPELINE_VERSION]).encode()).hexdigest()[:12]


DEFAULT_MAX_PAGES = None  # the depth guard is an option, off by default


def ensure_router(repo: Path, model_dir: Path, budget: float = 0.01, train_requests: int = 40_000,
                  certify_requests: int = 40_000, heldout_requests: int = 3_000, seed: int = 0, workers: int = 2,
                  max_pages: int | None = DEFAULT_MAX_PAGES, confidence: float = 0.5) -> dict:
    """Train (or reuse) an estimator and params for this model set and install them as the
    latest estimator / recycle_router versions. Returns paths and the params.

    The estimator is trained on one randomised log; `comrecycle solve` certifies λ on another
    (doubly robust, `confidence` as in `solve --confidence`); a small third log with q_0..q_3
    draws the one-step frontier. max_pages: the optional depth guard (a cached list that has
    served this many pages is not recycled again)."""
    from .cli import main as cli_main
    from .estimator.estimator import EffectLossEstimator
    from .repository import install_estimator, install_router_params, installed_versions
    from .sim.logs import read_log, write_log
    from .sim.recycling import simulate_log, simulate_log_sharded

    work = ROUTER_ARTIFACTS / _key(model_dir, train_requests, seed)
    work.mkdir(parents=True, exist_ok=True)
    train, cert, held = work / "train.parquet", work / f"certify_{certify_requests}.parquet", work / "heldout.parquet"
    est_dir = work / "estimator"
    params_path = work / f"params_b{budget:g}_c{confidence:g}_m{max_pages or 0}.json"
    for path, n, s, what in ((train, train_requests, seed + 101, "training"),
                             (cert, certify_requests, seed + 303, "certification")):
        if not path.exists():
            print(f"[router] simulating a uniformly randomised {what} log ({n} requests) ...", flush=True)
            t0 = time.time()
            write_log(simulate_log_sharded(model_dir, n, seed=s, logging="random", workers=workers,
                                           counterfactuals=False), path)
            print(f"[router] {what} log in {time.time() - t0:.0f}s", flush=True)
    if not held.exists():
        print(f"[router] simulating a held-out log with q_0..q_3 ({heldout_requests} requests) ...", flush=True)
        write_log(simulate_log(model_dir, heldout_requests, seed=seed + 202, logging="random"), held)
    if not (est_dir / "estimator.onnx").exists():
        print("[router] training the effect-loss estimator ...", flush=True)
        t0 = time.time()
        EffectLossEstimator(progress=True, **ESTIMATOR_OPTIONS).fit(read_log(train)).save(est_dir)
        print(f"[router] estimator trained in {time.time() - t0:.0f}s", flush=True)
    if not params_path.exists():  # `comrecycle solve`: λ certified for the budget, measured c_j and estimator cost
        rc = cli_main(["solve", "--logs", str(cert), "--estimator", str(est_dir), "--budget", str(budget),
                       "--confidence", str(confidence), "--cost-profile", str(model_dir / "cost_profile.json"),
                       "--out", str(params_path)] + (["--max-pages", str(max_pages)] if max_pages else []))
        if rc != 0:
            raise RuntimeError(f"comrecycle solve failed (exit {rc})")
    params = json.loads(params_path.read_text())
    # install only what differs from the latest installed versions (no new version per run)
    est_versions = installed_versions(repo / "estimator", "model.onnx")
    est_version = repo / "estimator" / str(est_versions[-1]) if est_versions else None
    if est_version is None or _sha(est_version / "model.onnx") != _sha(est_dir / "estimator.onnx"):
        est_version = install_estimator(repo, est_dir)
    router_versions = installed_versions(repo / "recycle_router", "params.json")
    router_version = repo / "recycle_router" / str(router_versions[-1]) if router_versions else None
    want = dict(params, estimator_model_version=int(est_version.name))
    if router_version is None or json.loads((router_version / "params.json").read_text()) != want:
        router_version = install_router_params(repo, params_path, estimator_version=int(est_version.name))
    print(f"[router] installed estimator v{est_version.name} and recycle_router v{router_version.name} "
          f"(λ = {params['lambda']:.4g} for a {100 * budget:g}% loss budget; depth guard: "
          f"{'a list serves at most ' + str(max_pages) + ' pages' if max_pages else 'off'})", flush=True)
    return {"work": work, "heldout": held, "estimator": est_dir, "params": params}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bootstrap_loss_ci(routed, full, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Effect loss % = 1 - mean clicks(router) / mean clicks(always-full), and a 95% CI by
    resampling whole sessions of each replay (Poisson weights)."""
    rng = np.random.default_rng(seed)

    def session_sums(r):
        _, inv = np.unique(r.session_id, return_inverse=True)
        return np.bincount(inv, r.expected_clicks), np.bincount(inv)

    (ra, rn), (fa, fn) = session_sums(routed), session_sums(full)
    point = 100 * (1 - (ra.sum() / rn.sum()) / (fa.sum() / fn.sum()))
    wr, wf = rng.poisson(1.0, (n_boot, ra.size)), rng.poisson(1.0, (n_boot, fa.size))
    ratio = ((wr @ ra) / (wr @ rn)) / ((wf @ fa) / (wf @ fn))
    lo, hi = np.percentile(100 * (1 - ratio), [2.5, 97.5])
    return float(point), float(lo), float(hi)


def summarise(routed, full, costs, estimator_cost: float, paired=None) -> dict:
    """paired: (q_served, q_full) of shadow_full_cascade, the loss on the same requests."""
    served = routed.strategy >= 0
    c = np.asarray(costs, float)
    spent = c[np.maximum(routed.strategy, 0)] + estimator_cost * routed.is_repeat
    saved = 100 * (1 - spent[served].sum() / (c[0] * served.sum()))
    tr_loss, tr_lo, tr_hi = bootstrap_loss_ci(routed, full)
    if paired is not None:
        from .policy.closed_loop import relative_loss_ci
        q_served, q_full = paired
        loss, lo, hi = relative_loss_ci(q_full, q_served, routed.session_id, n_boot=2000, seed=0)
    else:
        loss, lo, hi = tr_loss, tr_lo, tr_hi
    mix = {int(j): float(np.mean(routed.strategy[routed.is_repeat] == j)) for j in range(len(c))}
    return {"requests": routed.requests, "repeated_share": float(routed.is_repeat.mean()),
            "errors": {"recycle_router": routed.errors, "cascade": full.errors},
            "compute_saved_pct": float(saved), "effect_loss_pct": loss, "effect_loss_ci95": [lo, hi],
            "effect_loss_definition": ("same requests: the full cascade's page on each served state (shadow, "
                                       "in-process)" if paired is not None else "two replays on the same seeds"),
            "trajectory_effect_loss_pct": tr_loss, "trajectory_effect_loss_ci95": [tr_lo, tr_hi],
            "expected_clicks_per_request": {"recycle_router": float(routed.expected_clicks.mean()),
                                            "always_full": float(full.expected_clicks.mean())},
            "strategy_mix_of_repeats": mix,
            "latency_ms": {"recycle_router": {str(k): v for k, v in routed.latency_by_strategy().items()},
                           "always_full": _lat(full.latency_s)},
            "throughput_rps": {"recycle_router": routed.requests / routed.seconds,
                               "always_full": full.requests / full.seconds}}


def _lat(seconds) -> dict:
    from client.replay import latency_summary

    return latency_summary(list(seconds))


def print_summary(s: dict, budget: float) -> None:
    lo, hi = s["effect_loss_ci95"]
    print("\n== ComRecycle: recycle_router vs always-full, same simulated sessions and seeds ==")
    print(f"requests: {s['requests']} ({100 * s['repeated_share']:.0f}% repeated); errors: router "
          f"{s['errors']['recycle_router']}, always-full {s['errors']['cascade']}")
    print(f"compute saved:  {s['compute_saved_pct']:.1f}% (stage costs c_j, plus the estimator's where it was called)")
    tl, (tlo, thi) = s["trajectory_effect_loss_pct"], s["trajectory_effect_loss_ci95"]
    print(f"effect loss:    {s['effect_loss_pct']:.2f}% [95% CI {lo:.2f}, {hi:.2f}] (budget {100 * budget:g}%), on the "
          "same requests: the page served vs the full cascade's page on the same state")
    print(f"                {tl:.2f}% [95% CI {tlo:.2f}, {thi:.2f}] between the two replays (expected clicks/request "
          f"{s['expected_clicks_per_request']['recycle_router']:.4f} vs {s['expected_clicks_per_request']['always_full']:.4f}; "
          "independent trajectories, hence the wide interval)")
    print("strategy mix of repeated requests: " + ", ".join(
        f"{j}: {100 * v:.1f}%" for j, v in s["strategy_mix_of_repeats"].items()))
    print("latency per strategy (router, client-side): " + "; ".join(
        f"{j}: p50 {v['p50']:.1f} ms, p99 {v['p99']:.1f} ms" for j, v in s["latency_ms"]["recycle_router"].items()))
    f = s["latency_ms"]["always_full"]
    print(f"always-full (cascade): p50 {f['p50']:.1f} ms, p99 {f['p99']:.1f} ms; throughput "
          f"{s['throughput_rps']['recycle_router']:.0f} vs {s['throughput_rps']['always_full']:.0f} req/s "
          "(replay, client in the loop)")


def run_demo(a) -> int:
    from client.replay import replay_pair, world_from_repository

    from .build_cli import ensure_model_set
    from .policy.decide import predict
    from .policy.frontier import frontier, write_frontier
    from .repository import repository_server
    from .serving.redis_server import RedisServer
    from .sim.logs import read_log

    repo = Path(a.repository)
    model_dir = Path(a.models) if a.models else REPO_ROOT / "artifacts" / "models" / a.profile
    ensure_model_set(a.profile, model_dir, repo, seed=a.seed, progress=True)
    info = ensure_router(repo, model_dir, budget=a.budget, train_requests=a.train_requests,
                         certify_requests=a.certify_requests, seed=a.seed, max_pages=a.max_pages or None,
                         confidence=a.confidence)
    world = world_from_repository(repo)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    print("[demo] starting redis-server and tritonserver ...", flush=True)
    with RedisServer() as redis_srv:
        env = {"COMRECYCLE_REDIS_URL": redis_srv.url}
        with repository_server(repo, env=env, startup_timeout=300) as srv:
            print(f"[demo] ready: gRPC {srv.grpc_url}, metrics {srv.metrics_endpoint}, Redis {redis_srv.url}",
                  flush=True)
            routed, full = replay_pair(srv.grpc_url, world, a.requests, a.concurrency, seed=a.seed + 1)
    p = info["params"]
    # the router calls (and pays for) the estimator only when the decision can depend on it
    uses_estimator = float(p["lambda"]) > 0 or float(p.get("omega", 0.0)) > 0
    print("[demo] paired evaluation: the full cascade on every state the router served (in-process) ...", flush=True)
    from client.replay import shadow_full_cascade
    paired = shadow_full_cascade(routed, world, model_dir)
    s = summarise(routed, full, p["costs"], float(p.get("estimator_cost", 0.0)) if uses_estimator else 0.0, paired)
    s["estimator_called"] = uses_estimator
    s["params"] = {k: p.get(k) for k in ("lambda", "omega", "costs", "estimator_cost", "budget", "max_pages",
                                         "loss_floor", "certification")}
    print_summary(s, a.budget)
    guard = f"the depth guard (a list serves at most {p['max_pages']} pages)" if p.get("max_pages") else "no guard"
    if uses_estimator:
        print(f"policy: λ = {p['lambda']:.4g} with the estimator's ΔQ̂ on every repeated request, and {guard}")
        c = p.get("certification")
        if c:
            print(f"        λ certified on {c['requests']:,} held-out logged requests (DR, confidence {c['confidence']:g}): "
                  f"one-step loss {c['loss_pct']:.2f}% [95% {c['ci_pct'][0]:.2f}, {c['ci_pct'][1]:.2f}] on the logged "
                  "cache states; the replay above is the closed loop, where the caches age under the policy")
    else:
        print(f"policy: λ = 0 (on the solving log's states the predicted loss stays under the budget at any λ), "
              f"so ΔQ̂ cannot change a decision and the estimator is not called: the decisions are the "
              f"cheapest usable strategy under {guard} (see docs/RESULTS.md, 'The policy')")
    if routed.first_errors or full.first_errors:
        print("first errors:", *(routed.first_errors + full.first_errors), sep="\n  ")
    # the one-step frontier on the held-out log, with the replay's measured point
    log = read_log(info["heldout"])
    from .estimator.estimator import EffectLossEstimator
    q_hat, dq = predict(log, EffectLossEstimator.load(info["estimator"]))
    res = frontier(log, p["costs"], q_hat, dq, estimator_cost=float(p.get("estimator_cost", 0.0)))
    res["measured"] = {"recycle_router on Triton (replay)": {
        "loss_pct": s["effect_loss_pct"], "loss_ci95": s["effect_loss_ci95"], "saved_pct": s["compute_saved_pct"]}}
    files = write_frontier(res, out / "frontier", title="Curves: one-step, on a held-out log's cache states. "
                                                       "Star: recycle_router on Triton, in the feedback loop")
    (out / "demo_report.json").write_text(json.dumps(s, indent=2) + "\n")
    print(f"frontier: {files['png']} ({files['md']}); report: {out / 'demo_report.json'}")
    return 0 if routed.errors == 0 and full.errors == 0 else 1
