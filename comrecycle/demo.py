"""The main job (`comrecycle demo`, `bash scripts/demo.sh`).

1. the model set (built if missing, ~6-7 min on 2 cores) installed in the repository;
2. the effect-loss estimator and the router params (built if missing, cached in
   artifacts/router/): a uniformly randomised training log (observed clicks only), the
   estimator trained on it, `solve` certifying λ for the budget on a second randomised log
   (drawn with `--certify-arm-weights`: the full cascade or strategy 3 mostly, by default), and
   a small held-out log with q_j for the frontier; installed as new estimator / recycle_router
   versions;
3. redis-server and tritonserver started on free loopback ports;
4. simulated sessions replayed through recycle_router (client in the feedback loop) and, on
   the same seeds, through the always-full `cascade`;
5. the report: compute saved %, effect loss % (with a session-bootstrap 95% CI), the strategy
   mix, latency p50/p99 per strategy, and the frontier plot of the policy with the replay's
   measured point on it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .repository import REPO_ROOT

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

    from .build import ensure_model_set
    from .policy.deploy import ensure_router
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
                         confidence=a.confidence, certify_arm_weights=a.certify_arm_weights)
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
    from .router.params import RouterParams

    uses_estimator = RouterParams.from_dict(p).uses_estimator
    print("[demo] paired evaluation: the full cascade on every state the router served (in-process) ...", flush=True)
    from client.replay import shadow_full_cascade
    paired = shadow_full_cascade(routed, world, model_dir)
    s = summarise(routed, full, p["costs"], float(p.get("estimator_cost", 0.0)) if uses_estimator else 0.0, paired)
    s["estimator_called"] = uses_estimator
    s["params"] = {k: p.get(k) for k in ("lambda", "omega", "costs", "estimator_cost", "budget", "max_pages",
                                         "loss_floor", "certification", "solved_on")}
    shares = info["certify_shares"]
    s["params"]["certification_log_shares"] = list(shares) if shares else "uniform"
    print_summary(s, a.budget)
    guard = f"the depth guard (a list serves at most {p['max_pages']} pages)" if p.get("max_pages") else "no guard"
    if uses_estimator:
        print(f"policy: λ = {p['lambda']:.4g} with the estimator's ΔQ̂ on every repeated request, and {guard}")
        c = p.get("certification")
        if c:
            from .policy.certify import interval_label

            drawn = ("uniformly" if not shares else
                     "with shares " + "/".join(f"{x:g}" for x in shares) + " of strategies 0..3")
            print(f"        λ certified on {c['requests']:,} held-out logged requests, drawn {drawn} (DR, confidence "
                  f"{c['confidence']:g}): one-step loss {c['loss_pct']:.2f}% [{interval_label(c['confidence'])}: "
                  f"{c['ci_pct'][0]:.2f}, {c['ci_pct'][1]:.2f}] on the "
                  "logged cache states; the replay above is the closed loop, where the caches age under the policy")
    else:
        print(f"policy: λ = 0 (on the solving log's states the predicted loss stays under the budget at any λ), "
              f"so ΔQ̂ cannot change a decision and the estimator is not called: the decisions are the "
              f"cheapest usable strategy under {guard} (see docs/history.md, \"λ from the estimator's predicted loss\")")
    if routed.first_errors or full.first_errors:
        print("first errors:", *(routed.first_errors + full.first_errors), sep="\n  ")
    # the one-step frontier on the held-out log, with the replay's measured point
    log = read_log(info["heldout"])
    from .estimator.effect_loss import EffectLossEstimator
    q_hat, dq = predict(log, EffectLossEstimator.load(info["estimator"]))
    res = frontier(log, p["costs"], q_hat, dq, estimator_cost=float(p.get("estimator_cost", 0.0)))
    res["measured"] = {"recycle_router on Triton (replay)": {
        "loss_pct": s["effect_loss_pct"], "loss_ci95": s["effect_loss_ci95"], "saved_pct": s["compute_saved_pct"]}}
    files = write_frontier(res, out / "frontier", title="Curves: one-step, on a held-out log's cache states. "
                                                       "Star: recycle_router on Triton, in the feedback loop")
    (out / "demo_report.json").write_text(json.dumps(s, indent=2) + "\n")
    print(f"frontier: {files['png']} ({files['md']}); report: {out / 'demo_report.json'}")
    return 0 if routed.errors == 0 and full.errors == 0 else 1
