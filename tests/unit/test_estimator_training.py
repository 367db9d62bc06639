"""Training options of the effect-loss estimator: weight averaging over the last epochs and the
view-adjusted label (its squared-error loss, saved in the manifest)."""
import json

import numpy as np
import torch

from comrecycle.estimator.effect_loss import EffectLossEstimator


def _weights(est):
    return {k: v.detach().clone() for k, v in est.net_.state_dict().items()}


def test_averaging_one_epoch_is_the_last_epoch_and_two_is_their_mean(tiny_random_log):
    last = EffectLossEstimator(max_epochs=3, min_epochs=3, progress=False).fit(tiny_random_log)
    one = EffectLossEstimator(max_epochs=3, average_epochs=1, progress=False).fit(tiny_random_log)
    for k, v in _weights(last).items():
        torch.testing.assert_close(v, _weights(one)[k])
    two_epochs = EffectLossEstimator(max_epochs=2, min_epochs=2, progress=False).fit(tiny_random_log)
    avg = EffectLossEstimator(max_epochs=3, average_epochs=2, progress=False).fit(tiny_random_log)
    w2, w3, wa = _weights(two_epochs), _weights(last), _weights(avg)
    for k in wa:
        torch.testing.assert_close(wa[k], ((w2[k].double() + w3[k].double()) / 2).to(wa[k].dtype))
    assert avg.history_["epochs"] == 3


def test_averaging_trains_every_epoch_despite_early_stopping(tiny_random_log):
    est = EffectLossEstimator(max_epochs=6, patience=1, average_epochs=3, progress=False).fit(tiny_random_log)
    assert est.history_["epochs"] == 6


def test_view_adjusted_label_is_saved_and_reloaded(tiny_random_log, tmp_path):
    est = EffectLossEstimator(max_epochs=1, label="view-adjusted", average_epochs=1, progress=False)
    est.fit(tiny_random_log).save(tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["params"]["label"] == "view-adjusted" and m["params"]["average_epochs"] == 1
    back = EffectLossEstimator.load(tmp_path)
    assert back.label == "view-adjusted"
    rep = tiny_random_log.filter(tiny_random_log["is_repeat"])
    np.testing.assert_allclose(back.predict_log(rep)[1], est.predict_log(rep)[1], rtol=1e-5, atol=1e-6)


def test_a_saved_estimator_predicts_with_onnxruntime_what_torch_predicts(tiny_estimator, tiny_random_log, tmp_path):
    from comrecycle.estimator.log_features import features_from_log

    est = EffectLossEstimator.load(tiny_estimator)
    feats = features_from_log(tiny_random_log)
    assert est._onnx_session() is not None
    q_ort, dq_ort = est.predict(feats)
    est.onnx_path_ = None  # the torch path
    q_t, dq_t = est.predict(feats)
    np.testing.assert_allclose(dq_ort, dq_t, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(q_ort, q_t, rtol=1e-4, atol=1e-5)
    # calibrating invalidates the saved graph until it is saved again
    est = EffectLossEstimator.load(tiny_estimator).calibrate(tiny_random_log, min_rows=20)
    assert est._onnx_session() is None
    q_cal, _ = est.predict(feats)
    est.save(tmp_path / "cal")
    assert est._onnx_session() is not None
    np.testing.assert_allclose(est.predict(feats)[0], q_cal, rtol=1e-4, atol=1e-5)
    # an empty log
    q0, dq0 = est.predict({k: v[:0] for k, v in feats.items()})
    assert q0.shape == (0, 4) and dq0.shape == (0, 3)


def test_an_ensemble_serves_the_mean_of_its_members_and_its_first_member_is_the_single_model(
        tiny_random_log, tmp_path):
    from comrecycle.estimator.log_features import features_from_log
    from comrecycle.estimator.network import EnsembleNet

    single = EffectLossEstimator(max_epochs=2, progress=False).fit(tiny_random_log)
    ens = EffectLossEstimator(max_epochs=2, ensemble=3, progress=False).fit(tiny_random_log)
    assert isinstance(ens.net_, EnsembleNet) and len(ens.history_["members"]) == 3
    for k, v in _weights(single).items():  # member 0 is trained exactly as ensemble = 1 would be
        torch.testing.assert_close(v, ens.net_.members[0].state_dict()[k])
    feats = features_from_log(tiny_random_log.filter(tiny_random_log["is_repeat"]))
    X = ens._tensors(feats)
    with torch.no_grad():
        member_dq = [m(*X)[1].numpy() for m in ens.net_.members]
    assert np.abs(member_dq[1] - member_dq[0]).max() > 1e-4  # other seeds, other nets
    _, dq = ens.predict(feats)
    np.testing.assert_allclose(dq, np.mean(member_dq, 0), rtol=1e-5, atol=1e-6)
    # saved as one ONNX graph; reloaded, onnxruntime serves the same mean
    ens.save(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["params"]["ensemble"] == 3
    back = EffectLossEstimator.load(tmp_path)
    assert back._onnx_session() is not None and isinstance(back.net_, EnsembleNet)
    np.testing.assert_allclose(back.predict(feats)[1], dq, rtol=1e-4, atol=1e-5)


def test_true_q_errors_count_only_the_known_arms():
    from comrecycle.estimator.effect_loss import _true_q_errors

    q_hat = np.array([[2.0, 1.5, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 1.0, 1.0]])
    y = np.array([[2.5, 1.5, np.nan, 1.0], [1.0, np.nan, np.nan, np.nan], [np.nan, 1.0, np.nan, np.nan]],
                 np.float32)
    level, uplift = _true_q_errors(torch.log(torch.tensor(q_hat, dtype=torch.float32)), torch.tensor(y))
    # row 0: levels (0.5², 0, -, 0.5²); uplifts ΔQ̂ = (0.5, -, 1.5) against ΔQ = (1.0, -, 1.5)
    # row 2: q_0 unknown, so no uplift is known either; only the level of arm 1 counts
    np.testing.assert_allclose(level.numpy(), [0.5, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(uplift.numpy(), [0.25, 0.0, 0.0], atol=1e-6)


def _planted_uplift(log):
    """The log with ΔQ_j = 0.1·j·log(1 + gap) planted into its q_j (where known): a loss that a
    visible feature explains and the logged clicks know nothing of."""
    import pyarrow as pa

    secs = np.maximum(log["secs_since_prev"].to_numpy().astype(np.float64), 0.0)
    q0 = log["q_0"].to_numpy(zero_copy_only=False)
    for j in (1, 2, 3):
        qj = log[f"q_{j}"].to_numpy(zero_copy_only=False)
        new = np.where(np.isfinite(qj), q0 - 0.1 * j * np.log1p(secs), np.nan)
        log = log.set_column(log.column_names.index(f"q_{j}"), f"q_{j}",
                             pa.array(new, log.schema.field(f"q_{j}").type))
    return log


def test_true_q_label_learns_the_true_uplift_the_clicks_do_not_show(tiny_random_log, tiny_heldout_log, tmp_path):
    """Fitted to the q_j of one log, the "true-q" net ranks another log's requests by their true
    ΔQ; a net trained on the same log's clicks cannot (the planted loss is not in the clicks).
    It is saved and reloaded as such."""
    from scipy.stats import spearmanr

    train, held = _planted_uplift(tiny_random_log), _planted_uplift(tiny_heldout_log)
    rep = held.filter(held["is_repeat"])
    q = np.stack([rep[f"q_{j}"].to_numpy(zero_copy_only=False) for j in range(4)], 1)
    dq = q[:, :1] - q[:, 1:]
    known = np.isfinite(dq)

    def rank_corr(est):
        return spearmanr(est.predict_log(rep)[1][known], dq[known]).correlation

    true_q = EffectLossEstimator(max_epochs=10, batch_size=64, label="true-q", progress=False).fit(train)
    clicks = EffectLossEstimator(max_epochs=10, batch_size=64, progress=False).fit(train)
    assert rank_corr(true_q) > 0.8 > 0.3 > rank_corr(clicks)
    n_rep = int(train["is_repeat"].to_numpy().sum())
    assert true_q.history_["train_rows"] + true_q.history_["valid_rows"] == n_rep  # every repeat has q_0
    true_q.save(tmp_path)
    assert EffectLossEstimator.load(tmp_path).label == "true-q"


def test_true_q_label_drops_rows_without_q0_and_explains_what_it_needs(tiny_random_log):
    import pyarrow as pa
    import pytest

    from comrecycle.errors import UserError

    q0 = tiny_random_log["q_0"].to_numpy(zero_copy_only=False).copy()
    q0[::2] = np.nan  # a log whose counterfactuals were computed for half of the requests
    half = tiny_random_log.set_column(tiny_random_log.column_names.index("q_0"), "q_0", pa.array(q0))
    est = EffectLossEstimator(max_epochs=1, label="true-q", progress=False).fit(half)
    rep = tiny_random_log["is_repeat"].to_numpy()
    assert est.history_["train_rows"] + est.history_["valid_rows"] == int((rep & np.isfinite(q0)).sum())
    with pytest.raises(UserError, match="q_0..q_3"):
        EffectLossEstimator(max_epochs=1, label="true-q", progress=False).fit(tiny_random_log.drop_columns(["q_2"]))
    with pytest.raises(UserError, match="select"):
        EffectLossEstimator(max_epochs=1, label="true-q", select="uplift", progress=False).fit(tiny_random_log)
    with pytest.raises(UserError, match="calibration"):  # clicks would add their noise to the ceiling
        est.calibrate(tiny_random_log, min_rows=20)
