"""The router's offline loop for a model set: a randomised training log, the effect-loss
estimator trained on it, λ certified for a loss budget on a second randomised log (policy.solve),
a small held-out log with q_j for the frontier; installed as new `estimator` / `recycle_router`
versions of a model repository. The main job and the router benchmark call `ensure_router`;
its artefacts are cached under artifacts/router/<key>/.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from ..errors import UserError
from ..repository import REPO_ROOT

ROUTER_ARTIFACTS = REPO_ROOT / "artifacts" / "router"
# what the estimator is trained on and what λ is certified on: two randomised logs of other
# sessions, with propensities no smaller than 0.05 (the skewed session mixture that explores deep
# caches gives 1/0.02 weights and an off-policy interval too wide to use)
ESTIMATOR_OPTIONS = {"max_epochs": 8, "label": "view-adjusted", "ensemble": 3}
# the estimator learns uplift from noisy clicks: its ranking improved with the log's size up to
# 400 000 requests, and 800 000 ranked no better (docs/RESULTS.md, "The estimator's training seed,
# and an ensemble" and "Closed loop on the simulator")
DEFAULT_TRAIN_REQUESTS = 400_000
# λ is certified with a 95% upper bound on 200 000 requests: on 40 000 the bound's margin is wider
# than the budget (noise floor ~2.6%), and a point estimate on either size keeps the budget only by
# the luck of its draw (docs/RESULTS.md, "The certification log: size and confidence")
DEFAULT_CERTIFY_REQUESTS = 200_000
DEFAULT_CONFIDENCE = 0.95
# the certification log draws the full cascade and strategy 3 more often than strategies 1-2
# (propensities logged). A "full or strategy 3" rule's DR error then has inverse-propensity weights
# of about 2.2 instead of 4, and the logged rank lists are older, as the rule's own are; strategies
# 1-2 stay explored, so both rule families are certified (docs/RESULTS.md, "The certification log:
# size and confidence"). None = uniform.
DEFAULT_CERTIFY_ARM_WEIGHTS = (0.45, 0.05, 0.05, 0.45)
# the smallest probability share a strategy may get in the certification log: a rarer strategy
# gives inverse-propensity weights above 100 and an off-policy bound too wide to certify with
MIN_CERTIFY_ARM_SHARE = 0.01
PIPELINE_VERSION = 2  # part of the cache key: artifacts of an earlier pipeline are not reused


def certify_arm_shares(arm_weights, name: str = "certification log weights") -> tuple[float, ...] | None:
    """Relative weights of strategies 0..3 [4] -> their shares, summing to 1 and rounded to 3
    decimals (what the simulator draws with and what names the log), or None for a uniform
    draw (None, or shares that round to equal). Raises UserError for anything else."""
    if arm_weights is None:
        return None
    w = [float(x) for x in arm_weights]
    got = ",".join(f"{x:g}" for x in w)
    if len(w) != 4 or not all(0 < x < float("inf") for x in w):
        raise UserError(f"{name}: expected 4 positive finite numbers (strategies 0..3), got {got}")
    share = [x / sum(w) for x in w]
    if min(share) < MIN_CERTIFY_ARM_SHARE:
        raise UserError(f"{name}: every strategy needs a share of at least {MIN_CERTIFY_ARM_SHARE:g} "
                        f"(inverse-propensity weights above {1 / MIN_CERTIFY_ARM_SHARE:g} leave the off-policy "
                        f"bound too wide to certify); {got} gives shares {', '.join(f'{x:.2g}' for x in share)}")
    shares = tuple(round(x, 3) for x in share)
    return None if len(set(shares)) == 1 else shares


def certify_log_tag(arm_weights) -> str:
    """'' for a uniformly randomised log, else '_w' + the shares ('_w0.45-0.05-0.05-0.45'): part of
    the certification log's and the params' file names."""
    return _shares_tag(certify_arm_shares(arm_weights))


def _shares_tag(shares: tuple[float, ...] | None) -> str:
    return "" if shares is None else "_w" + "-".join(f"{x:g}" for x in shares)


def _key(model_dir: Path, train_requests: int, seed: int) -> str:
    m = json.loads((model_dir / "manifest.json").read_text())
    return hashlib.sha256(json.dumps([m.get("built_at"), m.get("seed"), m.get("profile"), train_requests,
                                      seed, PIPELINE_VERSION]).encode()).hexdigest()[:12]


DEFAULT_MAX_PAGES = None  # the depth guard is an option, off by default


def ensure_router(repo: Path, model_dir: Path, budget: float = 0.01,
                  train_requests: int = DEFAULT_TRAIN_REQUESTS, certify_requests: int = DEFAULT_CERTIFY_REQUESTS,
                  heldout_requests: int = 3_000, seed: int = 0, workers: int = 2,
                  max_pages: int | None = DEFAULT_MAX_PAGES, confidence: float = DEFAULT_CONFIDENCE,
                  certify_arm_weights=DEFAULT_CERTIFY_ARM_WEIGHTS) -> dict:
    """Train (or reuse) an estimator and params for this model set and install them as the
    latest estimator / recycle_router versions. Returns paths, the params and the certification
    log's strategy shares (None: uniform).

    The estimator is trained on one uniformly randomised log; `comrecycle solve` certifies λ on
    another (doubly robust, `confidence` as in `solve --confidence`), whose strategies are drawn
    with probabilities proportional to `certify_arm_weights` [4] among the available ones (None:
    uniformly); a small third log with q_0..q_3 draws the one-step frontier. max_pages: the
    optional depth guard (a cached list that has served this many pages is not recycled again)."""
    from ..estimator.effect_loss import EffectLossEstimator
    from ..repository import install_estimator, install_router_params, installed_versions
    from ..sim.logs import read_log, write_log
    from ..sim.recycling import simulate_log, simulate_log_sharded
    from .solve import SolveOptions, solve_files

    work = ROUTER_ARTIFACTS / _key(model_dir, train_requests, seed)
    work.mkdir(parents=True, exist_ok=True)
    shares = certify_arm_shares(certify_arm_weights)  # what names the log and what draws it
    tag = _shares_tag(shares)
    train, cert, held = work / "train.parquet", work / f"certify_{certify_requests}{tag}.parquet", work / "heldout.parquet"
    # the estimator and the params it was certified with, per estimator recipe (the logs are shared)
    recipe = hashlib.sha256(json.dumps(ESTIMATOR_OPTIONS, sort_keys=True).encode()).hexdigest()[:8]
    est_dir = work / f"estimator-{recipe}"
    params_path = est_dir / f"params_b{budget:g}_c{confidence:g}_m{max_pages or 0}_n{certify_requests}{tag}.json"
    cert_weights = None if shares is None else [list(shares)]
    for path, n, s, weights, what in ((train, train_requests, seed + 101, None, "training"),
                                      (cert, certify_requests, seed + 303, cert_weights, "certification")):
        if not path.exists():
            how = (f"uniformly randomised {what} log" if weights is None else
                   f"randomised {what} log (strategies 0..3 drawn with shares "
                   f"{', '.join(f'{w:g}' for w in weights[0])} among the available ones)")
            print(f"[router] simulating a {how} ({n} requests) ...", flush=True)
            t0 = time.time()
            write_log(simulate_log_sharded(model_dir, n, seed=s, logging="random", workers=workers,
                                           arm_weights=weights, counterfactuals=False), path)
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
        res = solve_files(cert, est_dir, SolveOptions(budget=budget, confidence=confidence, max_pages=max_pages),
                          cost_profile=str(model_dir / "cost_profile.json"), out=params_path)
        pr = res.params["predicted"]
        print(f"[router] solved λ = {res.params['lambda']:.4g}: {pr['how']} effect loss {pr['effect_loss_pct']:.3f}%, "
              f"compute saved {pr['compute_saved_pct']:.2f}% on {res.log.num_rows:,} held-out requests", flush=True)
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
    return {"work": work, "heldout": held, "estimator": est_dir, "params": params, "certify_shares": shares}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
