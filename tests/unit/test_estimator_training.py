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
