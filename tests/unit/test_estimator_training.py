"""Training options of the effect-loss estimator: weight averaging over the last epochs and the
view-adjusted label (its squared-error loss, saved in the manifest)."""
import json

import numpy as np
import torch

from comrecycle.estimator.estimator import EffectLossEstimator


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
