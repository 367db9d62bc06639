"""The list-origin feature of the effect-loss estimator: the session page each cached list was
computed for (request page - pages served), and loading estimators saved before it existed."""
import json

import numpy as np
import torch

from comrecycle.estimator.network import COUNT_BUCKETS, EffectLossNet


def test_origin_is_the_page_each_present_list_was_computed_for():
    net = EffectLossNet(n_items=10, list_origin=True)
    absent = [-1.0, -1.0, -1.0]
    cache_state = torch.tensor([absent + [30.0, 2.0, 50.0] + [12.0, 3.0, 40.0],   # page 5
                                absent + absent + [4.0, 1.0, 80.0],                # page 1
                                absent + absent + [9.0, 40.0, 10.0]])              # page 60: clipped
    page = torch.tensor([5.0, 1.0, 60.0])
    dense, *embs = net.origin_features(cache_state, page)
    np.testing.assert_allclose(dense.numpy(), [[0, 3 / 5, 2 / 5], [0, 0, 0], [0, 0, (COUNT_BUCKETS - 2) / 5]])
    # the embeddings looked up are those of buckets: absent -> the last one
    for j, emb in enumerate(embs):
        want = {0: [COUNT_BUCKETS - 1] * 3, 1: [3, COUNT_BUCKETS - 1, COUNT_BUCKETS - 1],
                2: [2, 0, COUNT_BUCKETS - 2]}[j]
        np.testing.assert_array_equal(emb.detach().numpy(), net.cache_origin[j].weight[want].detach().numpy())


def test_without_cache_state_the_origin_is_ignored():
    net = EffectLossNet(n_items=10, use_cache_state=False, list_origin=True)
    cs = torch.tensor([[1.0, 2.0, 3.0] * 3])
    a = net.origin_features(cs, torch.tensor([7.0]))
    b = net.origin_features(torch.full_like(cs, -1.0), torch.tensor([7.0]))
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_estimators_saved_before_the_origin_feature_still_load(tiny_random_log, tmp_path):
    from comrecycle.estimator.effect_loss import EffectLossEstimator
    from comrecycle.estimator.log_features import features_from_log

    feats = features_from_log(tiny_random_log.filter(tiny_random_log["is_repeat"]).slice(0, 200))
    old = EffectLossEstimator(max_epochs=1, list_origin=False, progress=False).fit(tiny_random_log)
    old.save(tmp_path / "old")
    manifest = json.loads((tmp_path / "old" / "manifest.json").read_text())
    del manifest["params"]["list_origin"]  # as written before the feature existed
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(manifest))
    loaded = EffectLossEstimator.load(tmp_path / "old")
    assert loaded.list_origin is False
    np.testing.assert_allclose(loaded.predict(feats)[1], old.predict(feats)[1], rtol=1e-6)

    new = EffectLossEstimator(max_epochs=1, progress=False).fit(tiny_random_log)
    assert new.list_origin is True
    new.save(tmp_path / "new")
    again = EffectLossEstimator.load(tmp_path / "new")
    assert again.list_origin is True
    np.testing.assert_allclose(again.predict(feats)[1], new.predict(feats)[1], rtol=1e-6)
