"""`comrecycle train-estimator`: end to end on a small randomised log, and clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "comrecycle.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def log_path(tiny_random_log, tmp_path_factory):
    p = tmp_path_factory.mktemp("logs") / "random.parquet"
    pq.write_table(tiny_random_log, p)
    return p


def test_train_estimator_writes_model_manifest_and_report(log_path, tmp_path):
    out = tmp_path / "est"
    r = cli("train-estimator", "--logs", str(log_path), "--out", str(out), "--max-epochs", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    for f in ("estimator.onnx", "manifest.json", "report.md", "uplift_curves.png", "metrics.json"):
        assert (out / f).exists() and (out / f).stat().st_size > 0, f
    m = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(m) == {"estimator (GRU+MMoE)", "T-learner (GBT)", "constant"}
    for name in m:
        assert set(m[name]["per_treatment"]) == {"1", "2", "3"}
    report = (out / "report.md").read_text()
    assert "T-learner" in report and "uplift_curves.png" in report
    assert json.loads((out / "manifest.json").read_text())["params"]["list_origin"] is True


def test_train_estimator_without_the_list_origin(log_path, tmp_path):
    out = tmp_path / "est"
    r = cli("train-estimator", "--logs", str(log_path), "--out", str(out), "--max-epochs", "1", "--no-baselines",
            "--no-list-origin", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "manifest.json").read_text())["params"]["list_origin"] is False


def test_train_estimator_on_view_adjusted_clicks(log_path, tmp_path):
    out = tmp_path / "est"
    r = cli("train-estimator", "--logs", str(log_path), "--out", str(out), "--max-epochs", "1", "--no-baselines",
            "--label", "view-adjusted", "--quiet")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["params"]["label"] == "view-adjusted"
    assert m["label_info"]["label"] == "view-adjusted" and len(m["label_info"]["examination_curve"]) == 20


def test_view_adjusted_labels_without_exposure_columns_are_refused(tiny_random_log, tmp_path):
    p = _write(tiny_random_log.drop_columns(["n_viewed"]), tmp_path)
    r = cli("train-estimator", "--logs", str(p), "--out", str(tmp_path / "o"), "--label", "view-adjusted", "--quiet")
    assert r.returncode != 0
    assert "lacks ['n_viewed']" in r.stderr and "--label clicks" in r.stderr


def _write(table, tmp_path, name="bad.parquet"):
    p = tmp_path / name
    pq.write_table(table, p)
    return p


def _set(table, name, values):
    i = table.column_names.index(name)
    return table.set_column(i, table.schema.field(name), pa.array(values, table.schema.field(name).type))


@pytest.mark.parametrize("mutate,message", [
    (lambda t: t.drop(["propensity"]), "missing columns ['propensity']"),
    (lambda t: t.set_column(t.column_names.index("reward"), "reward",
                            pa.array(t["reward"].to_numpy().astype(np.float64))), "reward: expected float, got double"),
    (lambda t: _set(t, "strategy", np.zeros(t.num_rows, np.int8)), "no randomised rows"),
    (lambda t: _set(t, "propensity", np.where(np.arange(t.num_rows) == 5, 1.5, t["propensity"].to_numpy())),
     "propensities must be in (0, 1]"),
    (lambda t: _set(t, "propensity", np.where(np.arange(t.num_rows) == 5, 0.0, t["propensity"].to_numpy())),
     "propensities must be in (0, 1]"),
])
def test_bad_logs_get_clear_errors(tiny_random_log, tmp_path, mutate, message):
    p = _write(mutate(tiny_random_log), tmp_path)
    r = cli("train-estimator", "--logs", str(p), "--out", str(tmp_path / "o"), "--quiet")
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


def test_missing_and_non_parquet_files(tmp_path):
    r = cli("train-estimator", "--logs", str(tmp_path / "nope.parquet"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    r = cli("train-estimator", "--logs", str(junk), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "cannot read as Parquet" in r.stderr


def test_bad_cache_state_column_is_a_clear_error(tiny_random_log, tmp_path):
    t = tiny_random_log.drop(["cache_state"]).append_column(
        "cache_state", pa.array([[1.0, 2.0]] * tiny_random_log.num_rows, pa.list_(pa.float32())))
    r = cli("train-estimator", "--logs", str(_write(t, tmp_path)), "--out", str(tmp_path / "o"), "--quiet")
    assert r.returncode == 2 and "cache_state: expected fixed_size_list<float32>[9]" in r.stderr, r.stderr


def _with_cache_state(feats, value):
    return dict(feats, cache_state=np.full_like(feats["cache_state"], value))


def test_cache_state_is_used_only_when_the_logs_carry_it(tiny_random_log):
    from comrecycle.estimator.effect_loss import EffectLossEstimator
    from comrecycle.estimator.log_features import features_from_log

    f = features_from_log(tiny_random_log.slice(0, 64))
    assert (f["cache_state"] >= -1).all() and (f["cache_state"][:, 1::3].max() >= 1)
    with_cs = EffectLossEstimator(max_epochs=1, progress=False).fit(tiny_random_log)
    assert with_cs.use_cache_state_
    q_a, _ = with_cs.predict(_with_cache_state(f, -1.0))
    q_b, _ = with_cs.predict(_with_cache_state(f, 3.0))
    assert np.abs(q_a - q_b).max() > 1e-4
    without = EffectLossEstimator(max_epochs=1, progress=False).fit(tiny_random_log.drop(["cache_state"]))
    assert not without.use_cache_state_
    q_a, _ = without.predict(_with_cache_state(f, -1.0))
    q_b, _ = without.predict(_with_cache_state(f, 3.0))
    np.testing.assert_array_equal(q_a, q_b)


def test_several_training_logs_are_concatenated_with_distinct_sessions(log_path, tiny_random_log):
    from comrecycle.estimator.training import read_training_logs

    t = read_training_logs([log_path, log_path])
    n = tiny_random_log.num_rows
    assert t.num_rows == 2 * n
    sessions = t["session_id"].to_numpy()
    assert len(np.unique(sessions)) == 2 * len(np.unique(tiny_random_log["session_id"].to_numpy()))
    assert len(np.unique(t["request_id"].to_numpy())) == 2 * n


def test_min_epochs_keeps_early_stopping_away(tiny_random_log):
    from comrecycle.estimator.effect_loss import EffectLossEstimator

    est = EffectLossEstimator(max_epochs=3, min_epochs=3, patience=1, progress=False).fit(tiny_random_log)
    assert est.history_["epochs"] == 3


def test_min_epochs_above_max_epochs_is_refused(tmp_path):
    from comrecycle.cli import main

    assert main(["train-estimator", "--logs", str(tmp_path / "x.parquet"), "--out", str(tmp_path / "o"),
                 "--max-epochs", "3", "--min-epochs", "5"]) == 2


def test_train_estimator_refuses_an_ensemble_of_no_nets(log_path, tmp_path):
    r = cli("train-estimator", "--logs", str(log_path), "--out", str(tmp_path / "e"), "--ensemble", "0", "--quiet")
    assert r.returncode == 2 and "--ensemble must be >= 1 net, got 0" in r.stderr and "Traceback" not in r.stderr
