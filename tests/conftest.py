"""Shared fixtures.

tiny_model_set   the 'tiny' profile built once (cached under artifacts/test-models/, keyed by
                 the hash of the code that defines it) — real training, real ONNX export
tiny_repository  a model repository generated from specs.py with that model set installed
triton           a real embedded tritonserver serving tiny_repository on free ports
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_KEY_SOURCES = ["comrecycle/models", "comrecycle/sim", "comrecycle/profiles.py", "comrecycle/specs.py",
                "comrecycle/build.py", "comrecycle/runtime"]


def _code_key() -> str:
    h = hashlib.sha256()
    for src in _KEY_SOURCES:
        p = ROOT / src
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(f.relative_to(ROOT).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


@pytest.fixture(scope="session")
def tiny_model_set() -> Path:
    from comrecycle.build import build_model_set

    out = ROOT / "artifacts" / "test-models" / f"tiny-{_code_key()}"
    if not (out / "cost_profile.json").exists():
        if out.exists():
            shutil.rmtree(out)
        build_model_set("tiny", out, seed=0, progress=False, quality_requests=300)
    return out


@pytest.fixture(scope="session")
def tiny_manifest(tiny_model_set) -> dict:
    return json.loads((tiny_model_set / "manifest.json").read_text())


@pytest.fixture(scope="session")
def tiny_world(tiny_manifest):
    from comrecycle.sim.world import world_for

    return world_for(tiny_manifest)


@pytest.fixture(scope="session")
def tiny_cascade(tiny_model_set):
    from comrecycle.runtime.cascade import InProcessCascade

    return InProcessCascade.load(tiny_model_set)


@pytest.fixture(scope="session")
def tiny_random_log(tiny_model_set):
    """A randomised recycling log served by the tiny cascade (q_0..q_3 included)."""
    from comrecycle.sim.recycling import simulate_log

    return simulate_log(tiny_model_set, 1500, seed=5, logging="random", concurrency=64, progress=False)


@pytest.fixture(scope="session")
def tiny_heldout_log(tiny_model_set):
    """Another randomised log of the tiny world (other sessions): what `solve` certifies λ on."""
    from comrecycle.sim.recycling import simulate_log

    return simulate_log(tiny_model_set, 1500, seed=6, logging="random", concurrency=64, progress=False)


@pytest.fixture(scope="session")
def tiny_estimator(tiny_random_log, tmp_path_factory) -> Path:
    """A small effect-loss estimator trained on tiny_random_log (directory with ONNX + manifest)."""
    from comrecycle.estimator.effect_loss import EffectLossEstimator

    out = tmp_path_factory.mktemp("estimator")
    EffectLossEstimator(max_epochs=3, progress=False).fit(tiny_random_log).save(out)
    return out


@pytest.fixture(scope="session")
def tiny_repository(tiny_model_set, tiny_estimator, tmp_path_factory) -> Path:
    from comrecycle.repository import install_estimator, install_model_set

    repo = tmp_path_factory.mktemp("model_repository")
    install_model_set(repo, tiny_model_set, "cpu")
    install_estimator(repo, tiny_estimator)
    return repo


@pytest.fixture(scope="session")
def triton(tiny_repository):
    from comrecycle.repository import repository_server

    with repository_server(tiny_repository, startup_timeout=180) as srv:
        yield srv


@pytest.fixture(scope="session")
def sample_contexts(tiny_world):
    """64 realistic requests: first pages and repeats (with exclusions and fresh clicks)."""
    from comrecycle.sim import LoggingPolicy, SessionSimulator

    sim = SessionSimulator(tiny_world, seed=21, concurrency=16)
    pol = LoggingPolicy(tiny_world, 21)
    out = []
    while len(out) < 64:
        b = sim.next_batch()
        out += [b.context(i) for i in range(len(b))]
        sim.feedback(b, pol(b))
    return out[:64]


@pytest.fixture(scope="session")
def default_model_set() -> Path:
    """The default profile (the published scale), built once and cached like the tiny one.
    Calibration figures are defined on the models that are really served."""
    from comrecycle.build import build_model_set

    out = ROOT / "artifacts" / "test-models" / f"default-{_code_key()}"
    if not (out / "cost_profile.json").exists():
        if out.exists():
            shutil.rmtree(out)
        build_model_set("default", out, seed=0, progress=False)
    return out
