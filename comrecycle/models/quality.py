"""Is the cascade a real recommender? Stage quality measured in the simulator.

On held-out sessions served by the cascade itself (feedback loop), for each request:
  relevant = the RELEVANT items the user would most likely click now (true interest,
             session-exposed items excluded);
  recall@K of each stage's output (K = its top-k) against `relevant`, next to a popularity
  baseline (most-clicked items of the training log) and a uniform random draw of K items;
  expected clicks of the final page vs the popularity page, a random page and the oracle page.
"""
from __future__ import annotations

import numpy as np

from ..runtime.cascade import InProcessCascade
from ..sim import SessionSimulator, World
from ..specs import PAGE_SIZE
from ..specs import STAGES, CascadeSizes

RELEVANT = 50


def stage_quality(world: World, cascade: InProcessCascade, sizes: CascadeSizes, popularity: np.ndarray,
                  n_requests: int = 2000, seed: int = 12345, progress: bool = True) -> dict:
    """popularity: [n_items] click counts per item index from the training log."""
    rng = np.random.default_rng(seed)
    sim = SessionSimulator(world, seed=seed, concurrency=min(128, world.n_users // 2))
    rec = {s: [] for s in STAGES}
    base = {"popularity": {s: [] for s in STAGES}, "random": {s: [] for s in STAGES}}
    clicks = {"cascade": [], "popularity": [], "random": [], "oracle": []}
    pop_order = np.argsort(-popularity, kind="stable")

    def serve(batch):
        res = cascade.run([batch.context(i) for i in range(len(batch))])
        logits = world.logits(batch.interest)
        for i in range(len(batch)):
            ex = world.item_index(batch.exclude[i])
            if ex.size:
                logits[i, ex] = -np.inf
        rel = np.argpartition(-logits, RELEVANT, axis=1)[:, :RELEVANT]
        for i, r in enumerate(res):
            relset = set(rel[i].tolist())
            ex = set(world.item_index(batch.exclude[i]).tolist())
            pop = [j for j in pop_order[:sizes.retrieval + len(ex)] if j not in ex]
            rand = rng.choice(world.n_items, sizes.retrieval, replace=False)
            for s in STAGES:
                k = sizes.top_k(s)
                got = world.item_index(r[f"{s}_items"])
                rec[s].append(len(relset.intersection(got.tolist())) / RELEVANT)
                base["popularity"][s].append(len(relset.intersection(pop[:k])) / RELEVANT)
                base["random"][s].append(len(relset.intersection(rand[:k].tolist())) / RELEVANT)
            pages = {
                "cascade": world.item_index(r["rerank_items"]),
                "popularity": np.asarray(pop[:PAGE_SIZE]),
                "random": rand[:PAGE_SIZE],
                "oracle": rel[i][np.argsort(-logits[i, rel[i]])][:PAGE_SIZE],
            }
            for name, p in pages.items():
                clicks[name].append(float(world.expected_clicks(batch.interest[i:i + 1], p[None, :])[0]))
        return [r["rerank_items"] for r in res]

    sim.run(n_requests, serve, progress=progress, desc="stage quality")
    out = {"relevant_set": f"top-{RELEVANT} true click probability, session-exposed excluded",
           "requests": n_requests, "recall": {}, "expected_clicks_per_page": {}}
    for s in STAGES:
        out["recall"][s] = {"k": sizes.top_k(s), "cascade": float(np.mean(rec[s])),
                            "popularity": float(np.mean(base["popularity"][s])),
                            "random": float(np.mean(base["random"][s]))}
    out["expected_clicks_per_page"] = {k: float(np.mean(v)) for k, v in clicks.items()}
    return out


def quality_markdown(q: dict) -> str:
    lines = ["| stage | K | recall@K cascade | popularity | random |", "|---|---|---|---|---|"]
    for s, r in q["recall"].items():
        lines.append(f"| {s} | {r['k']} | {r['cascade']:.3f} | {r['popularity']:.3f} | {r['random']:.3f} |")
    c = q["expected_clicks_per_page"]
    lines += ["", "| page served by | expected clicks per page |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in c.items()]
    return "\n".join(lines)
