"""perf_analyzer against `cascade` and the trivial-model floor, in one run, one command.

Starts the embedded tritonserver on the model repository (plus a repository holding the
floor model `floor_identity`), writes realistic --input-data (many distinct simulated users,
each with its history, features and session exclusions), and measures both models over
gRPC and HTTP at each concurrency. Writes results.csv and results.md in --out.

    python -m perf.cascade_perf --concurrency 1 4 16 --out runs/perf
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from comrecycle.serving.floor import FLOOR_INPUT, FLOOR_MODEL, write_floor_repository
from comrecycle.repository import DEFAULT_REPOSITORY, loadable_models
from comrecycle.serving.server import TritonServer

from .perf_analyzer_run import format_rows, run_perf, write_input_data, write_rows_csv

REPO_ROOT = Path(__file__).resolve().parents[1]


def cascade_input_data(repo: Path, n: int, seed: int = 11) -> list[dict[str, np.ndarray]]:
    """n distinct simulated requests (a mix of first pages and repeats) for `cascade`."""
    from client.replay import world_from_repository
    from comrecycle.sim import LoggingPolicy, SessionSimulator

    world = world_from_repository(repo)
    sim = SessionSimulator(world, seed=seed, concurrency=min(64, world.n_users // 2))
    policy = LoggingPolicy(world, seed)
    out: list[dict[str, np.ndarray]] = []
    while len(out) < n:  # advance the sessions so that repeats carry exclusions and history
        batch = sim.next_batch()
        out.extend(batch.context(i) for i in range(len(batch)))
        sim.feedback(batch, policy(batch))
    return out[:n]


def run(repo: Path, out: Path, concurrency: list[int], protocols: list[str], measurement_ms: int,
        n_inputs: int, label: str = "") -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    inputs = cascade_input_data(repo, n_inputs)
    cascade_json = write_input_data(out / "cascade_input.json", inputs)
    users = np.unique(np.concatenate([c["user_id"] for c in inputs]))
    floor_json = write_input_data(out / "floor_input.json", [{FLOOR_INPUT: np.array([u])} for u in users])
    rows = []
    with tempfile.TemporaryDirectory() as floor_repo:
        write_floor_repository(floor_repo)
        models = loadable_models(repo) + [FLOOR_MODEL]
        with TritonServer(repo, model_control="explicit", load_models=models,
                          extra_args=("--model-repository", floor_repo)) as srv:
            print(f"server ready in {srv.startup_seconds:.1f}s", flush=True)
            for proto in protocols:
                url = srv.grpc_url if proto == "grpc" else srv.http_url
                for model, data in ((FLOOR_MODEL, floor_json), ("cascade", cascade_json)):
                    print(f"perf_analyzer {model} {proto} concurrency {concurrency} ...", flush=True)
                    rows += run_perf(model, url, proto, concurrency, input_data=str(data),
                                     measurement_interval_ms=measurement_ms, label=label or "cascade_perf")
    write_rows_csv(rows, out / "results.csv")
    (out / "results.md").write_text(markdown(rows))
    return rows


def markdown(rows: list[dict]) -> str:
    floor = {(r["protocol"], r["concurrency"]): r for r in rows if r["model"] == FLOOR_MODEL}
    lines = ["| model | protocol | concurrency | infer/s | p50 ms | p95 ms | p99 ms | throughput vs floor |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = floor.get((r["protocol"], r["concurrency"]))
        ratio = r["throughput_infer_per_s"] / f["throughput_infer_per_s"] if f else float("nan")
        lines.append(f"| {r['model']} | {r['protocol']} | {r['concurrency']} | {r['throughput_infer_per_s']:.1f} | "
                     f"{r['p50_us'] / 1e3:.2f} | {r['p95_us'] / 1e3:.2f} | {r['p99_us'] / 1e3:.2f} | {ratio:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.cascade_perf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", default=str(DEFAULT_REPOSITORY["cpu"]),
                    help="model repository with an installed model set")
    ap.add_argument("--out", default=str(REPO_ROOT / "runs" / "perf"))
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--protocols", nargs="+", choices=("grpc", "http"), default=["grpc", "http"])
    ap.add_argument("--measurement-ms", type=int, default=3000, help="perf_analyzer measurement window")
    ap.add_argument("--inputs", type=int, default=256, help="distinct requests in --input-data")
    a = ap.parse_args(argv)
    repo = Path(a.repository)
    if not (repo / "manifest.json").exists():
        print(f"error: {repo} has no installed model set; run `python build_models.py` first", file=sys.stderr)
        return 2
    t0 = time.time()
    rows = run(repo, Path(a.out), a.concurrency, a.protocols, a.measurement_ms, a.inputs)
    print(format_rows(rows))
    print(markdown(rows))
    print(f"wrote {Path(a.out) / 'results.csv'} and results.md in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
