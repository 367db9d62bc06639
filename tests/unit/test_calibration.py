"""Per-depth calibration of ΔQ̂: recovers a known depth effect from a randomised log (DR,
isotonic), pools sparse depths, is grafted into the ONNX graph with the same numbers as the
numpy path, survives save/load, and the CLI reports it."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest

from comrecycle.estimator.calibration import DepthCalibration, depth_of, fit_depth_calibration
from comrecycle.specs import N_RECYCLE

ROOT = Path(__file__).resolve().parents[2]


def synthetic_log(n=60000, seed=0, slope=0.12, bias_pred=0.0):
    """Requests at depths 1..8; true ΔQ_j = slope·depth·j/3; Q_0 = 2; the 'estimator'
    predicts a flat ΔQ̂ = bias_pred. Arms uniform over 0..3 (propensity 1/4)."""
    rng = np.random.default_rng(seed)
    depth = rng.integers(1, 9, n)
    cs = np.full((n, N_RECYCLE * 3), -1.0, np.float32)
    for j in range(N_RECYCLE):
        cs[:, 3 * j + 1] = depth
    true_dq = slope * depth[:, None] * (np.arange(1, 4)[None, :] / 3)
    q_true = np.concatenate([np.full((n, 1), 2.0), 2.0 - true_dq], 1)
    s = rng.integers(0, 4, n)
    y = rng.poisson(q_true[np.arange(n), s]).astype(np.float64)
    p = np.full(n, 0.25)
    q_hat = np.concatenate([np.full((n, 1), 2.0), np.full((n, 3), 2.0 - bias_pred)], 1)
    dq_hat = np.full((n, 3), bias_pred, np.float32)
    return q_hat, dq_hat, cs, s, y, p, true_dq, depth


def test_recovers_a_known_depth_effect():
    q, dq, cs, s, y, p, true_dq, depth = synthetic_log()
    cal = fit_depth_calibration(q, dq, cs, s, y, p, max_depth=10, min_rows=200)
    _, dq_cal = cal.apply(q, dq, cs)
    for j in range(3):
        for d in range(1, 9):
            sel = depth == d
            assert abs(dq_cal[sel, j].mean() - true_dq[sel, j].mean()) < 0.12, (j, d)
    # the fitted levels never decrease with depth
    for j in range(3):
        assert np.all(np.diff(cal.offsets[j, 1:9]) >= -1e-6)
    # a flat, wrong prediction is no longer flat: deep minus shallow ≈ 7 · slope for j = 3
    assert dq_cal[depth == 8, 2].mean() - dq_cal[depth == 1, 2].mean() > 0.6


def test_sparse_deep_buckets_borrow_the_last_measured_level():
    q, dq, cs, s, y, p, _, depth = synthetic_log(n=20000, seed=1)
    keep = (depth <= 4) | (np.arange(len(depth)) % 50 == 0)  # depths 5..8 nearly empty
    cal = fit_depth_calibration(q[keep], dq[keep], cs[keep], s[keep], y[keep], p[keep], max_depth=12,
                                min_rows=300)
    top = max(cal.report["strategies"]["3"]["depths"])
    assert top == 4
    assert np.all(cal.offsets[:, top + 1:] == cal.offsets[:, top:top + 1])
    assert np.all(cal.offsets[:, 0] == 0)  # no usable list: no offset


def test_absent_lists_get_no_offset_and_q_stays_consistent():
    cal = DepthCalibration(np.tile(np.arange(5, dtype=np.float32), (3, 1)))
    cs = np.full((2, 9), -1.0, np.float32)
    cs[1, 1::3] = [2, 7, 3]
    q = np.array([[2.0, 1.9, 1.8, 1.7], [3.0, 2.9, 2.8, 2.7]], np.float32)
    dq = q[:, :1] - q[:, 1:]
    q2, dq2 = cal.apply(q, dq, cs)
    np.testing.assert_allclose(dq2[0], dq[0])
    np.testing.assert_allclose(dq2[1], dq[1] + [2, 4, 3])  # depth 7 clipped to max_depth 4
    np.testing.assert_allclose(q2[:, 0], q[:, 0])
    np.testing.assert_allclose(q2[:, 1:], q2[:, :1] - dq2)
    assert np.array_equal(depth_of(cs), [[-1, -1, -1], [2, 7, 3]])


def test_bad_inputs_are_clear_errors():
    q, dq, cs, s, y, p, *_ = synthetic_log(n=100)
    with pytest.raises(ValueError, match="same rows"):
        fit_depth_calibration(q[:-1], dq, cs, s, y, p)
    with pytest.raises(ValueError, match="propensities"):
        fit_depth_calibration(q, dq, cs, s, y, np.zeros_like(p))
    with pytest.raises(ValueError, match="expected kind"):
        DepthCalibration.from_json(json.dumps({"kind": "other"}))
    with pytest.raises(ValueError, match="finite offsets"):
        DepthCalibration.from_json(json.dumps({"kind": "depth_offsets", "offsets": [[0.0, float("nan")]] * 3}))


def test_onnx_graft_matches_numpy_and_survives_save_load(tiny_estimator, tiny_random_log, tmp_path):
    from comrecycle.estimator.effect_loss import EffectLossEstimator
    from comrecycle.estimator.log_features import features_from_log

    est = EffectLossEstimator.load(tiny_estimator)
    rep = tiny_random_log.filter(tiny_random_log["is_repeat"])
    feats = features_from_log(rep)
    q_raw, dq_raw = est.predict(feats)
    est.calibration_ = DepthCalibration(np.tile(np.linspace(0, 1.2, 7, dtype=np.float32), (3, 1)) *
                                        np.array([[1.0], [0.5], [2.0]], np.float32))
    q_cal, dq_cal = est.predict(feats)
    assert not np.allclose(dq_cal, dq_raw)
    out = tmp_path / "cal"
    est.save(out)
    sess = ort.InferenceSession(str(out / "estimator.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["q", "delta_q"], {k: v for k, v in feats.items()})
    np.testing.assert_allclose(got[1], dq_cal, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got[0], q_cal, rtol=1e-4, atol=1e-4)
    again = EffectLossEstimator.load(out)
    np.testing.assert_allclose(again.predict(feats)[1], dq_cal, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(again.predict(feats, raw=True)[1], dq_raw, rtol=1e-5, atol=1e-6)
    assert json.loads((out / "manifest.json").read_text())["calibrated"] is True


def test_calibrate_estimator_cli(tiny_estimator, tiny_random_log, tmp_path):
    log = tmp_path / "calib.parquet"
    pq.write_table(tiny_random_log, log)
    src = tmp_path / "est"
    shutil.copytree(tiny_estimator, src)
    out = tmp_path / "est_cal"
    r = subprocess.run([sys.executable, "-m", "comrecycle.cli", "calibrate-estimator", "--estimator", str(src),
                        "--logs", str(log), "--out", str(out), "--min-rows", "20"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "offset" in r.stdout and (out / "calibration.json").exists()
    assert not (src / "calibration.json").exists()  # the source estimator is left as it was
    m = json.loads((out / "manifest.json").read_text())
    assert m["calibrated"] and m["calibration_log"] == str(log)
    r = subprocess.run([sys.executable, "-m", "comrecycle.cli", "calibrate-estimator", "--estimator",
                        str(tmp_path / "nope"), "--logs", str(log)], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode != 0 and "expected a directory written by train-estimator" in r.stderr


def test_calibration_can_use_the_view_adjusted_label(tiny_estimator, tiny_random_log):
    from comrecycle.estimator.effect_loss import EffectLossEstimator
    from comrecycle.estimator.log_features import features_from_log
    from comrecycle.estimator.labels import training_labels

    est = EffectLossEstimator.load(tiny_estimator)
    assert est.label == "clicks"  # an estimator from before the option: its default
    adjusted = est.calibrate(tiny_random_log, label="view-adjusted", min_rows=20).calibration_.offsets
    clicks = est.calibrate(tiny_random_log, min_rows=20).calibration_.offsets
    rep_mask = tiny_random_log["is_repeat"].to_numpy()
    rep = tiny_random_log.filter(tiny_random_log["is_repeat"])
    feats = features_from_log(rep)
    q, dq = est.predict(feats, raw=True)
    y = training_labels(tiny_random_log, "view-adjusted")[0][rep_mask]
    want = fit_depth_calibration(q, dq, feats["cache_state"], rep["strategy"].to_numpy(), y,
                                 rep["propensity"].to_numpy(), min_rows=20).offsets
    np.testing.assert_allclose(adjusted, want)
    assert not np.allclose(adjusted, clicks)


def test_a_strategy_the_log_never_served_is_not_calibrated():
    q, dq, cs, s, y, p, _, _ = synthetic_log(n=20000, seed=3)
    keep = s != 2  # strategy 2 never explored
    cal = fit_depth_calibration(q[keep], dq[keep], cs[keep], s[keep], y[keep], p[keep], max_depth=10, min_rows=200)
    r = cal.report["strategies"]["2"]
    assert r["unexplored"] and "served strategy 2 on 0" in r["skipped"]
    assert np.all(cal.offsets[1] == 0)
    assert np.any(cal.offsets[2] != 0) and "depths" in cal.report["strategies"]["3"]


def test_calibrate_estimator_cli_warns_about_unexplored_strategies(tiny_estimator, tiny_random_log, tmp_path):
    import pyarrow.compute as pc

    log = tmp_path / "no2.parquet"
    pq.write_table(tiny_random_log.filter(pc.not_equal(tiny_random_log["strategy"], 2)), log)
    src = tmp_path / "est"
    shutil.copytree(tiny_estimator, src)
    r = subprocess.run([sys.executable, "-m", "comrecycle.cli", "calibrate-estimator", "--estimator", str(src),
                        "--logs", str(log), "--out", str(tmp_path / "cal"), "--min-rows", "20"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "WARNING: strategy 2 is not calibrated (offsets 0): not explored: the log served strategy 2 on 0" in r.stdout
    assert "WARNING: strategy 3" not in r.stdout
