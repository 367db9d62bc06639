"""Generated configs: committed, regenerated identically, structurally valid for all variants."""
import filecmp
import subprocess
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from comrecycle.profiles import get_profile
from comrecycle.repository import (COMMITTED_CONFIGS, REPO_ROOT, VARIANTS, all_configs,
                                   check_repository_configs, write_configs)
from comrecycle.specs import STAGES


@pytest.mark.parametrize("variant", VARIANTS)
def test_regeneration_matches_committed(variant, tmp_path):
    written = write_configs(tmp_path, get_profile("default").sizes, variant)
    committed = COMMITTED_CONFIGS[variant]
    diffs = []
    for f in written:
        rel = f.relative_to(tmp_path)
        if not (committed / rel).exists() or not filecmp.cmp(f, committed / rel, shallow=False):
            diffs.append(str(rel))
    extra = {p.relative_to(committed) for p in committed.glob("*/config.pbtxt")} - \
        {f.relative_to(tmp_path) for f in written}
    assert not diffs and not extra, (f"{committed} is stale: {diffs + sorted(map(str, extra))}; "
                                     f"run `python build_models.py --configs-only`")


@pytest.mark.parametrize("variant", VARIANTS)
def test_configs_are_valid(variant):
    assert check_repository_configs(COMMITTED_CONFIGS[variant]) == []


def test_check_catches_a_broken_ensemble(tmp_path):
    write_configs(tmp_path, get_profile("tiny").sizes, "cpu")
    p = tmp_path / "cascade_from_rank" / "config.pbtxt"
    p.write_text(p.read_text().replace('value: "prerank_items"', 'value: "nonexistent"'))
    problems = check_repository_configs(tmp_path)
    assert any("nonexistent" in x for x in problems)


def test_ensembles_expose_intermediate_outputs():
    cfgs = all_configs(get_profile("default").sizes)
    outs = {n: {o.name for o in c.output} for n, c in cfgs.items()}
    assert outs["cascade"] == {f"{s}_{k}" for s in STAGES for k in ("items", "scores")}
    assert outs["cascade_from_prerank"] >= {"prerank_items", "rank_items", "rerank_items"}
    assert outs["cascade_from_rank"] >= {"rank_items", "rerank_items"}


def test_ids_are_int64_never_bytes():
    for v in VARIANTS:
        for c in all_configs(get_profile("default").sizes, v).values():
            for t in list(c.input) + list(c.output):
                # FP64 only for the optional request_time (Unix seconds need more than FP32)
                allowed = (mc.TYPE_INT64, mc.TYPE_FP32) + ((mc.TYPE_FP64,) if t.name == "request_time" else ())
                assert t.data_type in allowed, (c.name, t.name)


def test_variants_differ_where_they_should():
    cpu = all_configs(get_profile("default").sizes, "cpu")["rank"]
    gpu = all_configs(get_profile("default").sizes, "gpu")["rank"]
    native = all_configs(get_profile("default").sizes, "container")["rank"]
    assert cpu.backend == "comrecycle_stage" and cpu.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert gpu.backend == "comrecycle_stage" and gpu.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert gpu.parameters["device"].string_value == "gpu"
    assert native.platform == "onnxruntime_onnx" and native.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    for c in (cpu, gpu, native):
        assert c.dynamic_batching is not None and c.max_batch_size > 1
        text_format.Parse(text_format.MessageToString(c), mc.ModelConfig())


def test_repositories_hold_no_code_the_python_models_name_their_backend(tmp_path):
    """One model.py per kind, under the backend directory: a repository holds configs and weights."""
    from comrecycle.serving.backends import BACKENDS, install_backends, model_py

    for variant in VARIANTS:
        written = write_configs(tmp_path / variant, get_profile("default").sizes, variant)
        assert not [p for p in written if p.name == "model.py"]
        assert not list((tmp_path / variant).rglob("model.py"))
        backends = {c.name: c.backend for c in all_configs(get_profile("default").sizes, variant).values()}
        assert backends["recycle_router"] == "comrecycle_router"
        if variant != "container":
            assert {backends[s] for s in STAGES} == {"comrecycle_stage"}
            assert backends["estimator"] == "comrecycle_estimator"
        assert "python" not in backends.values()
    for repo in COMMITTED_CONFIGS.values():
        tracked = subprocess.run(["git", "ls-files", str(repo)], cwd=REPO_ROOT, capture_output=True, text=True)
        if tracked.returncode == 0:
            assert not [f for f in tracked.stdout.split() if f.endswith("model.py")]
    made = install_backends(tmp_path / "backends")
    assert sorted(p.parent.name for p in made) == sorted(BACKENDS)
    for p in made:
        assert p.read_bytes() == model_py(p.parent.name).read_bytes()
    with pytest.raises(ValueError, match="unknown backend"):
        model_py("python")


def test_load_plan_says_why_each_model_cannot_load(tmp_path):
    from comrecycle.repository import load_plan

    write_configs(tmp_path, get_profile("tiny").sizes, "cpu")
    ok, why = load_plan(tmp_path)
    assert ok == []
    for stage in STAGES:
        assert "build the model set" in why[stage]
    assert "comrecycle train-estimator" in why["estimator"] and "install-estimator" in why["estimator"]
    assert "install-params" in why["recycle_router"]
    assert "cannot load" in why["cascade"]
    # with the stages "built" (any model.onnx), the ensembles load and the router says what it lacks
    for stage in STAGES:
        (tmp_path / stage / "1" / "model.onnx").write_bytes(b"")
    (tmp_path / "recycle_router" / "1" / "params.json").write_text("{}")
    ok, why = load_plan(tmp_path)
    assert {"cascade", "cascade_from_prerank", "cascade_from_rank", *STAGES} <= set(ok)
    assert set(why) == {"estimator", "recycle_router"}
    assert why["recycle_router"] == "it calls ['estimator'], which cannot load"


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_router_s_call_sizes_fit_the_configs_it_calls(variant):
    """The router chunks its BLS calls by CALL_MAX_BATCH and its estimator calls by
    the estimator's max batch (settings.SERVING): every model it calls must take batches that large."""
    from comrecycle.router.batch import CALL_MAX_BATCH, STRATEGY_MODEL
    from comrecycle.settings import SERVING

    ESTIMATOR_MAX_BATCH = SERVING.estimator_max_batch

    cfgs = all_configs(get_profile("default").sizes, variant)
    for model in STRATEGY_MODEL.values():
        assert cfgs[model].max_batch_size >= CALL_MAX_BATCH, model
    assert cfgs["estimator"].max_batch_size >= ESTIMATOR_MAX_BATCH
    assert cfgs["recycle_router"].max_batch_size <= CALL_MAX_BATCH  # a router batch fits one call per group


def test_launcher_backend_directory_holds_the_python_backend_and_ours(tmp_path):
    """Triton loads a Python-based backend only when libtriton_python.so lies inside the backend
    directory (copies, not links); our model.py files link to this checkout's package."""
    from comrecycle.serving.backends import BACKENDS, model_py
    from comrecycle.serving.server import backend_directory

    d = backend_directory(cache_root=tmp_path)
    for name in ("libtriton_python.so", "triton_python_backend_stub", "triton_python_backend_utils.py"):
        assert (d / "python" / name).is_file() and not (d / "python" / name).is_symlink()
    for b in BACKENDS:
        assert (d / b / "model.py").resolve() == model_py(b).resolve()
    assert backend_directory(cache_root=tmp_path) == d  # valid: reused as it is
    (d / BACKENDS[0] / "model.py").unlink()
    assert backend_directory(cache_root=tmp_path) == d and (d / BACKENDS[0] / "model.py").exists()  # rebuilt
