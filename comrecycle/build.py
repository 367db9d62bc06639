"""Build a model set: bootstrap log -> four trained stages -> ONNX -> quality -> cost profile.

Output directory (one model set):
  bootstrap.parquet      the simulated log the stages learned from (docs/contracts.md#request-log-schema)
  {stage}.onnx           raw-id ONNX models (vocabularies inside)
  manifest.json          profile, sizes, world seed, versions, git SHA, time, training metrics
  quality.json / .md     stage quality in the simulator vs popularity and random
  cost_profile.json      measured per-stage cost and c_j
"""
from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from . import __version__
from .models.export import export_stage, index_inputs
from .models.quality import quality_markdown, stage_quality
from .models.train import StageTrainer, log_arrays
from .models.vocab import Vocab
from .profiles import Profile, get_profile
from .repository import COMMITTED_CONFIGS, VARIANTS, install_model_set, write_configs
from .runtime.cascade import InProcessCascade
from .runtime.costs import cost_profile
from .runtime.stage import pad_lists
from .sim import LoggingPolicy, SessionSimulator, World
from .sim.logs import write_log
from .specs import STAGES, stage_specs

log = logging.getLogger("comrecycle.build")


def git_sha(cwd: Path | None = None) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd or Path(__file__).parent,
                              capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # not a checkout
        return "unknown"


def _parity(modules, specs, uv, iv, cascade: InProcessCascade, contexts: list[dict]) -> dict:
    """Max |torch - onnxruntime| score difference per stage on real requests."""
    out = {}
    full = cascade.run(contexts)
    for si, stage in enumerate(STAGES):
        rows = []
        for c, f in zip(contexts, full):
            r = {k: c[k][None] for k in ("user_id", "user_features", "request_features")}
            r["history"] = c["history"][None]
            if stage == "retrieval":
                r["exclude_items"] = c["exclude_items"][None]
            else:
                r["candidates"] = f[f"{STAGES[si - 1]}_items"][None]
            rows.append(r)
        packed = {}
        for k in rows[0]:
            arrs = [r[k] for r in rows]
            packed[k] = pad_lists(arrs) if k in ("history", "exclude_items", "candidates") else np.concatenate(arrs)
        with torch.no_grad():
            t_items, t_scores = modules[stage](*index_inputs(stage, packed, uv, iv))
        o_items, o_scores = cascade.stages[stage].session.run(
            [o.name for o in specs[stage].outputs], packed)
        fin = np.isfinite(o_scores)
        # near-ties among 20k retrieval scores may swap places under float rounding
        out[stage] = {"max_abs_score_diff": float(np.abs(t_scores.numpy()[fin] - o_scores[fin]).max()),
                      "same_item_fraction": float((t_items.numpy() == o_items).mean())}
    return out


def build_model_set(profile: str | Profile, out_dir: str | Path, seed: int = 0, progress: bool = True,
                    quality_requests: int | None = None) -> dict:
    p = get_profile(profile) if isinstance(profile, str) else profile
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    torch.manual_seed(seed)
    timings = {}

    t0 = time.time()
    world = World.generate(p.n_items, p.n_users, seed=seed)
    sim = SessionSimulator(world, seed=seed, concurrency=min(512, world.n_users // 4))
    table = sim.run(p.train_requests, LoggingPolicy(world, seed), progress=progress,
                    desc="bootstrap log").table()
    write_log(table, out / "bootstrap.parquet")
    timings["bootstrap_log_s"] = round(time.time() - t0, 1)
    log.info("bootstrap log: %d requests in %.1fs", table.num_rows, timings["bootstrap_log_s"])

    # split by session: the last 10% of sessions validate
    sessions = table["session_id"].to_numpy()
    cut = np.quantile(np.unique(sessions), 0.9)
    train_t = table.filter(pc.less_equal(table["session_id"], cut))
    valid_t = table.filter(pc.greater(table["session_id"], cut))
    user_vocab = Vocab(train_t["user_id"].to_numpy())
    item_vocab = Vocab(world.item_ids)  # the catalogue (an item table every real system has)
    t0 = time.time()
    # world.item_ids is sorted, so the catalogue's categories are already in vocabulary order
    trainer = StageTrainer(p, user_vocab, item_vocab, world.item_category, seed=seed, progress=progress)
    modules = trainer.fit_all(log_arrays(train_t, user_vocab, item_vocab),
                              log_arrays(valid_t, user_vocab, item_vocab))
    timings["train_s"] = round(time.time() - t0, 1)

    specs = stage_specs(p.sizes)
    for stage, m in modules.items():
        export_stage(m, specs[stage], user_vocab, item_vocab, out / f"{stage}.onnx")

    manifest = {
        "comrecycle_version": __version__, "profile": p.name, "seed": seed,
        "sizes": {s: p.sizes.top_k(s) for s in STAGES},
        "world": {"n_items": p.n_items, "n_users": p.n_users, "seed": seed},
        "model_versions": {s: 1 for s in STAGES},
        "vocab": {"users": len(user_vocab), "items": len(item_vocab)},
        "git_sha": git_sha(), "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "train_metrics": trainer.metrics, "timings": timings,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))

    cascade = InProcessCascade.load(out)
    probe = SessionSimulator(world, seed=seed + 99, concurrency=32).next_batch()
    contexts = [probe.context(i) for i in range(len(probe))]
    manifest["parity_torch_vs_onnxruntime"] = _parity(modules, specs, user_vocab, item_vocab, cascade,
                                                      contexts[:8])

    t0 = time.time()
    clicked = np.concatenate([world.item_index(np.asarray(x, np.int64))
                              for x in table["clicked_items"].to_pylist() if x] or [np.zeros(0, np.int64)])
    popularity = np.bincount(clicked[clicked >= 0], minlength=world.n_items).astype(np.float64)
    q = stage_quality(world, cascade, p.sizes, popularity,
                      n_requests=quality_requests or (1000 if p.name == "tiny" else 2000),
                      seed=seed + 7, progress=progress)
    (out / "quality.json").write_text(json.dumps(q, indent=2))
    (out / "quality.md").write_text(quality_markdown(q) + "\n")
    timings["quality_s"] = round(time.time() - t0, 1)

    costs = cost_profile(cascade, contexts, batch_size=8)
    (out / "cost_profile.json").write_text(json.dumps(costs, indent=2))
    timings["total_s"] = round(time.time() - t_start, 1)
    manifest["timings"] = timings
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def regenerate_committed_configs() -> list[Path]:
    """The committed configs are those of the default profile, for every variant."""
    sizes = get_profile("default").sizes
    written = []
    for v in VARIANTS:
        written += write_configs(COMMITTED_CONFIGS[v], sizes, v)
    return written


def ensure_model_set(profile: str, model_dir: Path, repository: Path | None, seed: int = 0,
                     force: bool = False, progress: bool = True, variant: str = "cpu") -> dict:
    """Build the model set unless one of the same profile and seed exists; install it."""
    mpath = model_dir / "manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.exists() else None
    if force or manifest is None or manifest.get("profile") != profile or manifest.get("seed") != seed \
            or not (model_dir / "cost_profile.json").exists():
        print(f"[build] building the '{profile}' model set into {model_dir} (seed {seed}) ...", flush=True)
        t0 = time.time()
        manifest = build_model_set(profile, model_dir, seed=seed, progress=progress)
        print(f"[build] done in {time.time() - t0:.0f}s", flush=True)
    else:
        print(f"[build] using the model set in {model_dir} (built {manifest['built_at']})", flush=True)
    if repository is not None:
        install_model_set(repository, model_dir, variant)
        print(f"[build] installed into {repository} ({variant})", flush=True)
    return manifest
