"""The effect-loss estimator served by a real tritonserver: parity with in-process, errors."""
import asyncio

import numpy as np
import pytest

from client.triton_client import CascadeClient, ServingError
from comrecycle.estimator.effect_loss import EffectLossEstimator
from comrecycle.estimator.log_features import features_from_log
from comrecycle.runtime.estimator_onnx import EstimatorRuntime

pytestmark = pytest.mark.integration


def _requests(table, n=24):
    f = features_from_log(table.slice(0, n))
    out = []
    for i in range(n):
        h = f["history"][i]
        out.append({"user_features": f["user_features"][i], "history": h[h >= 0],
                    "request_features": f["request_features"][i], "cache_state": f["cache_state"][i]})
    return out


async def _infer_all(url, protocol, reqs):
    async with CascadeClient(url, protocol) as c:
        async def one(r):
            try:
                return await c.infer("estimator", r)
            except ServingError as e:
                return e
        return await asyncio.gather(*[one(r) for r in reqs])


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_estimator_parity_triton_vs_in_process(triton, tiny_estimator, tiny_random_log, protocol):
    reqs = _requests(tiny_random_log)
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    got = asyncio.run(_infer_all(url, protocol, reqs))  # concurrent -> dynamically batched
    est = EffectLossEstimator.load(tiny_estimator)
    q_torch, dq_torch = est.predict(features_from_log(tiny_random_log.slice(0, len(reqs))))
    rt = EstimatorRuntime(tiny_estimator / "estimator.onnx")
    for i, (g, r) in enumerate(zip(got, reqs)):
        assert not isinstance(g, Exception), g
        local = rt.run([{k: np.asarray(v)[None] for k, v in r.items()}])[0]
        np.testing.assert_allclose(g["q"], local["q"][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g["q"], q_torch[i], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(g["delta_q"], dq_torch[i], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(g["delta_q"], g["q"][0] - g["q"][1:], rtol=1e-5, atol=1e-6)


def test_estimator_bad_inputs_and_cold_start(triton, tiny_random_log):
    good = _requests(tiny_random_log, 3)
    bad_nan = dict(good[0], request_features=np.array([np.nan, 1, 2, 0], np.float32))
    bad_neg = dict(good[1], history=np.array([4, -9], np.int64))
    bad_cache = dict(good[1], cache_state=np.zeros(4, np.float32))
    cold = dict(good[2], history=np.array([2**50, 3], np.int64), user_features=np.array([9, 99, 12345], np.int64))
    got = asyncio.run(_infer_all(triton.grpc_url, "grpc", [good[0], bad_nan, bad_neg, cold, bad_cache]))
    assert "model 'estimator', input 'request_features': expected finite values, got nan" in str(got[1])
    assert "model 'estimator', input 'history': ids and codes must be >= 0, got -9" in str(got[2])
    assert "cache_state" in str(got[4]) and "9" in str(got[4]) and "4" in str(got[4]), got[4]
    assert not isinstance(got[0], Exception) and not isinstance(got[3], Exception)
    assert np.isfinite(got[3]["q"]).all() and (got[3]["q"] > 0).all()


def test_estimator_versions_are_installed_side_by_side(tiny_repository, tiny_estimator):
    from comrecycle.repository import install_estimator

    v1 = tiny_repository / "estimator" / "1"
    assert (v1 / "model.onnx").exists() and (v1 / "manifest.json").exists()
    v2 = install_estimator(tiny_repository, tiny_estimator)
    try:
        assert v2.name == "2" and (v2 / "model.onnx").exists() and not (v2 / "model.py").exists()
    finally:
        import shutil
        shutil.rmtree(v2)
