"""Router params: what `comrecycle solve` writes deploys; anything else is refused clearly."""
import json

import pytest

from comrecycle.repository import (install_router_params, loadable_models,
                                   write_configs)
from comrecycle.router.params import ParamsError, RouterParams
from comrecycle.errors import UserError
from comrecycle.router.serving import model_set_fingerprint
from comrecycle.settings import RouterSettings
from comrecycle.specs import CascadeSizes

GOOD = {"lambda": 2.5, "costs": [1.0, 0.9, 0.8, 0.05], "omega": 0.0, "choice": "argmax",
        "estimator_cost": 0.02, "budget": 0.01}


def test_params_from_solve_output():
    p = RouterParams.from_dict(GOOD)
    assert p.lam == 2.5 and p.costs == (1.0, 0.9, 0.8, 0.05) and p.estimator_version == -1
    assert p.as_decide_params()["lambda"] == 2.5
    assert p.credit_gains and not RouterParams.from_dict({**GOOD, "credit_gains": False}).as_decide_params()["credit_gains"]
    q = RouterParams.from_dict({**GOOD, "strategies": [3], "loss_floor": 0.002})
    assert q.strategies == (0, 3) and q.as_decide_params()["strategies"] == [0, 3]
    assert q.as_decide_params()["loss_floor"] == 0.002 and p.as_decide_params()["strategies"] is None


def test_the_certified_family_and_loss_floor_shape_the_decision():
    import numpy as np

    from comrecycle.policy.decide import decide, policy_dq

    dq = np.array([[0.0, -0.2, 0.01, 0.02], [0.0, 0.3, 0.3, 0.3]])
    avail = np.ones((2, 4), bool)
    rule = RouterParams.from_dict({**GOOD, "lambda": 1000.0}).as_decide_params()
    assert decide(dq, avail, rule).tolist() == [1, 0]  # the predicted gain of strategy 1 is taken
    rule_f = RouterParams.from_dict({**GOOD, "lambda": 1000.0, "loss_floor": 0.05}).as_decide_params()
    assert decide(policy_dq(dq, rule_f), avail, rule_f).tolist() == [0, 0]  # no recycling counted as free
    rule_s = RouterParams.from_dict({**GOOD, "lambda": 0.0, "strategies": [0, 2]}).as_decide_params()
    assert decide(dq, avail, rule_s).tolist() == [2, 2]  # the cheapest allowed, not 3


@pytest.mark.parametrize("change,message", [
    ({"costs": [1.0, 0.9, 0.8]}, "'costs' must be 4 finite numbers"),
    ({"costs": [1.0, 0.9, float("nan"), 0.1]}, "'costs' must be 4 finite numbers"),
    ({"lambda": -1.0}, "'lambda' must be a finite number >= 0"),
    ({"omega": float("inf")}, "'omega' must be a finite number >= 0"),
    ({"choice": "best"}, "'choice' must be 'argmax' or 'sample'"),
    ({"estimator_cost": -0.1}, "'estimator_cost' must be >= 0"),
    ({"credit_gains": "no"}, "'credit_gains' must be true or false"),
    ({"loss_floor": -1}, "'loss_floor' must be null or a finite number >= 0"),
    ({"loss_floor": "x"}, "'loss_floor' must be null or a finite number >= 0"),
    ({"strategies": [5]}, r"'strategies' must be null or a non-empty list of strategy ids in 0..3"),
    ({"strategies": []}, r"'strategies' must be null or a non-empty list"),
])
def test_bad_params_are_refused(change, message):
    with pytest.raises(ParamsError, match=message):
        RouterParams.from_dict({**GOOD, **change})
    with pytest.raises(ParamsError, match=r"missing keys \['lambda'\]"):
        RouterParams.from_dict({"costs": GOOD["costs"]})


def test_install_router_params_makes_versions_and_the_router_loadable(tmp_path):
    repo = tmp_path / "repo"
    write_configs(repo, CascadeSizes(), "cpu")
    params = tmp_path / "params.json"
    params.write_text(json.dumps(GOOD))
    with pytest.raises(FileNotFoundError, match="no installed version: install an estimator first"):
        install_router_params(repo, params)
    with pytest.raises(FileNotFoundError, match="estimator version 3 is not installed"):
        install_router_params(repo, params, estimator_version=3)
    (repo / "estimator" / "3").mkdir()
    (repo / "estimator" / "3" / "model.onnx").write_bytes(b"")  # an installed version (its file, at least)
    v1 = install_router_params(repo, params, estimator_version=3)
    assert v1.name == "1" and json.loads((v1 / "params.json").read_text())["estimator_model_version"] == 3
    assert sorted(f.name for f in v1.iterdir()) == ["params.json"]  # params only: the code is the backend's
    assert install_router_params(repo, params, estimator_version=3).name == "2"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**GOOD, "lambda": -2}))
    with pytest.raises(ParamsError):
        install_router_params(repo, bad, estimator_version=3)
    # no stage ONNX installed: the router does not load (it needs the cascade suffixes)
    assert "recycle_router" not in loadable_models(repo)
    assert RouterParams.load(v1 / "params.json").estimator_version == 3


def test_settings_environment_overrides_config_and_fingerprint_tracks_the_stage_models(tmp_path):
    s = RouterSettings.resolve({"redis_url": "redis://cfg:1/0"}, env={"COMRECYCLE_REDIS_URL": "redis://env:2/0"})
    assert s.redis_url == "redis://env:2/0" and s.cache_ttl_s == 900.0
    assert RouterSettings.resolve({"redis_url": "redis://cfg:1/0"}, env={}).redis_url == "redis://cfg:1/0"
    assert RouterSettings.resolve({"lock_ms": "500"}, env={"COMRECYCLE_LOCK_MS": ""}).lock_ms == 500  # empty = unset
    for params, env, match in (({"lock_ms": "1.5"}, {}, r"lock_ms \(COMRECYCLE_LOCK_MS\): expected an integer"),
                               ({}, {"COMRECYCLE_CACHE_TTL_S": "soon"}, r"cache_ttl_s \(COMRECYCLE_CACHE_TTL_S\): expected a number"),
                               ({"cache_ttl_s": "-1"}, {}, r"cache_ttl_s .*expected a number > 0"),
                               ({"local_stages": "rank,ranker"}, {}, r"local_stages .*unknown: \['ranker'\]")):
        with pytest.raises(UserError, match=match):
            RouterSettings.resolve(params, env=env)
    # the committed config carries every setting but the password, and reads back as the defaults
    cfg = RouterSettings().config_parameters()
    assert "redis_password" not in cfg and RouterSettings.resolve(cfg, env={}) == RouterSettings()
    empty = model_set_fingerprint(tmp_path)  # no stage installed: a fingerprint all the same
    (tmp_path / "rank" / "1").mkdir(parents=True)
    (tmp_path / "rank" / "1" / "model.onnx").write_bytes(b"weights v1")
    f1 = model_set_fingerprint(tmp_path)
    assert f1 != empty and len(f1) == 16
    (tmp_path / "manifest.json").write_text(json.dumps({"versions": {"rank": 9}}))  # the manifest says nothing
    assert model_set_fingerprint(tmp_path) == f1
    (tmp_path / "rank" / "1" / "model.onnx").write_bytes(b"weights v1, retrained")  # same version, new content
    f2 = model_set_fingerprint(tmp_path)
    assert f2 != f1
    (tmp_path / "rank" / "2").mkdir()
    (tmp_path / "rank" / "2" / "model.onnx").write_bytes(b"weights v1, retrained")  # a new version
    assert model_set_fingerprint(tmp_path) not in (f1, f2)


def test_the_fingerprint_watch_sees_a_stage_reloaded_without_the_router(tmp_path):
    from comrecycle.router.serving import FingerprintWatch

    (tmp_path / "rank" / "1").mkdir(parents=True)
    (tmp_path / "rank" / "1" / "model.onnx").write_bytes(b"v1")
    now = [0.0]
    watch = FingerprintWatch(tmp_path, every_s=5.0, clock=lambda: now[0])
    first = watch()
    (tmp_path / "rank" / "2").mkdir()
    (tmp_path / "rank" / "2" / "model.onnx").write_bytes(b"v2")
    now[0] = 1.0
    assert watch() == first  # not checked again yet
    now[0] = 6.0
    assert watch() != first


def test_local_stages_run_the_installed_rerank_like_the_in_process_backend(tiny_repository, tiny_model_set, tmp_path):
    import asyncio

    import numpy as np

    from comrecycle.router.inprocess import InProcessBackend
    from comrecycle.router.serving import LocalStagesBackend, local_stage_runtimes

    class NoRemote:
        async def infer(self, model, inputs, outputs, version=-1):
            raise AssertionError(f"{model} should not leave the process")

    local = LocalStagesBackend(NoRemote(), local_stage_runtimes(tiny_repository, ["rerank"]))
    inputs = {"user_id": np.array([[1], [2]], np.int64), "user_features": np.array([[0, 1, 2], [1, 0, 3]], np.int64),
              "history": np.array([[3, 4], [5, -1]], np.int64),
              "request_features": np.array([[10.0, 1, 5, 1], [3.0, 2, 0, 0]], np.float32),
              "candidates": np.array([list(range(30)), list(range(40, 60)) + [-1] * 10], np.int64)}
    outs = ["rerank_items", "rerank_scores"]
    got = asyncio.run(local.infer("rerank", inputs, outs))
    ref = asyncio.run(InProcessBackend.load(tiny_model_set).infer("rerank", inputs, outs))
    np.testing.assert_array_equal(got["rerank_items"], ref["rerank_items"])
    np.testing.assert_allclose(got["rerank_scores"], ref["rerank_scores"], rtol=1e-6)
    with pytest.raises(ValueError, match=r"expected a subset of \['retrieval', 'prerank', 'rank', 'rerank'\], "
                                         r"got \['estimator'\]"):
        local_stage_runtimes(tiny_repository, ["rank", "estimator"])
    with pytest.raises(FileNotFoundError, match="no installed version"):
        local_stage_runtimes(tmp_path, ["rerank"])


def test_every_stage_local_serves_each_strategy_model_like_the_in_process_backend(tiny_repository, tiny_model_set):
    """local_stages = all four: the full cascade and both suffixes run in this process (the
    chains in a worker thread) and give the in-process reference's outputs; the estimator, not
    a stage, still goes to the remote backend; with only some stages local, a chain that needs
    a remote stage goes to the remote backend whole."""
    import asyncio

    import numpy as np

    from comrecycle.router.inprocess import InProcessBackend
    from comrecycle.router.serving import LocalStagesBackend, local_stage_runtimes
    from comrecycle.specs import STAGES, STRATEGY_CANDIDATES, STRATEGY_MODEL

    class Remote:
        def __init__(self):
            self.models = []

        async def infer(self, model, inputs, outputs, version=-1):
            self.models.append(model)
            return {"remote": np.zeros(1)}

    context = {"user_id": np.array([[1], [2]], np.int64),
               "user_features": np.array([[0, 1, 2], [1, 0, 3]], np.int64),
               "history": np.array([[3, 4], [5, -1]], np.int64),
               "request_features": np.array([[10.0, 1, 5, 1], [3.0, 2, 0, 0]], np.float32)}
    candidates = np.array([list(range(40)), list(range(40, 70)) + [-1] * 10], np.int64)
    reference = InProcessBackend.load(tiny_model_set)
    remote = Remote()
    local = LocalStagesBackend(remote, local_stage_runtimes(tiny_repository, list(STAGES)))
    try:
        for j, model in STRATEGY_MODEL.items():
            inputs = dict(context)
            if j == 0:
                inputs["exclude_items"] = np.array([[7, 8], [-1, -1]], np.int64)
            else:
                inputs[STRATEGY_CANDIDATES[j]] = candidates
            outs = ["rerank_items", "rerank_scores"] + (["rank_items"] if j < 3 else [])
            got = asyncio.run(local.infer(model, inputs, outs))
            ref = asyncio.run(reference.infer(model, inputs, outs))
            for k in outs:
                np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, err_msg=f"{model}: {k}")
        assert asyncio.run(local.infer("estimator", context, ["delta_q"])) == {"remote": np.zeros(1)}
        assert remote.models == ["estimator"]
    finally:
        local.close()
    partial = LocalStagesBackend(remote, local_stage_runtimes(tiny_repository, ["rank", "rerank"]))
    asyncio.run(partial.infer("cascade_from_prerank", dict(context, retrieval_items=candidates), ["rerank_items"]))
    asyncio.run(partial.infer("cascade_from_rank", dict(context, prerank_items=candidates), ["rerank_items"]))
    assert remote.models == ["estimator", "cascade_from_prerank"]
    partial.close()


def test_the_local_estimator_runs_the_pinned_version_like_the_in_process_backend(tiny_repository, tiny_estimator):
    """local_estimator = 1: the version the params pin runs in the router's process with the
    in-process backend's result; another version, or one not installed, goes to Triton."""
    import asyncio

    import numpy as np

    from comrecycle.router.inprocess import InProcessBackend
    from comrecycle.router.serving import LocalStagesBackend, local_estimator_runtime
    from comrecycle.runtime.estimator_onnx import EstimatorRuntime
    from comrecycle.specs import N_RECYCLE

    class Remote:
        def __init__(self):
            self.calls = []

        async def infer(self, model, inputs, outputs, version=-1):
            self.calls.append((model, version))
            return {"delta_q": np.zeros((len(inputs["history"]), N_RECYCLE), np.float32)}

    est = local_estimator_runtime(tiny_repository, -1)
    assert est is not None and est[0] >= 1
    assert local_estimator_runtime(tiny_repository, est[0] + 5) is None
    feats = {"user_features": np.array([[0, 1, 2], [1, 0, 3]], np.int64),
             "history": np.array([[3, 4], [5, -1]], np.int64),
             "request_features": np.array([[10.0, 1, 5, 1], [3.0, 2, 0, 0]], np.float32),
             "cache_state": np.array([[5.0, 1, 900, 5, 1, 300, 5, 1, 100], [60.0, 3, 800, 60, 3, 200, 60, 3, 40]],
                                     np.float32)}
    remote = Remote()
    local = LocalStagesBackend(remote, {}, estimator=est)
    got = asyncio.run(local.infer("estimator", feats, ["delta_q"], est[0]))
    ref = InProcessBackend({}, EstimatorRuntime(tiny_estimator / "estimator.onnx")).run("estimator", feats, ["delta_q"])
    np.testing.assert_allclose(got["delta_q"], ref["delta_q"], rtol=1e-6)
    assert remote.calls == [] and np.abs(got["delta_q"]).sum() > 0
    asyncio.run(local.infer("estimator", feats, ["delta_q"], -1))
    assert remote.calls == []
    asyncio.run(local.infer("estimator", feats, ["delta_q"], est[0] + 1))  # another version: Triton's
    assert remote.calls == [("estimator", est[0] + 1)]


def test_decide_and_the_router_share_one_params_validator(tmp_path):
    """`comrecycle decide` and recycle_router refuse the same params with the same message."""
    from comrecycle.policy.decide import load_params

    for bad, match in (({"lambda": 1.0}, r"missing keys \['costs'\]"),
                       ({**GOOD, "strategies": [0, 7]}, "'strategies' must be null or a non-empty list"),
                       ({**GOOD, "choice": "best"}, "'choice' must be 'argmax' or 'sample'")):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(bad))
        for load in (load_params, RouterParams.load):
            with pytest.raises(ParamsError, match=match):
                load(path)
    path = tmp_path / "good.json"
    path.write_text(json.dumps(GOOD))
    p = load_params(path)
    assert p == {**GOOD, **RouterParams.load(path).as_decide_params()} and p["choice"] == "argmax"
