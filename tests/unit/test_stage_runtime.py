"""Stage runtime and in-process cascade on the tiny model set (real ONNX, no server)."""
import json

import numpy as np
import pytest

from comrecycle.runtime.costs import strategy_costs
from comrecycle.runtime.stage import StageResult
from comrecycle.runtime.validation import InputError
from comrecycle.specs import STAGES


def req(ctx, **extra):
    r = {k: np.asarray(v)[None] for k, v in ctx.items() if k != "exclude_items"}
    r.update({k: np.asarray(v)[None] for k, v in extra.items()})
    return r


def test_full_cascade_shapes(tiny_cascade, tiny_manifest, sample_contexts):
    sizes = tiny_manifest["sizes"]
    out = tiny_cascade.run(sample_contexts[:4])
    for o, ctx in zip(out, sample_contexts[:4]):
        for s in STAGES:
            assert o[f"{s}_items"].shape == (sizes[s],)
            assert np.all(np.diff(o[f"{s}_scores"]) <= 1e-6)  # best first
        assert not set(o["retrieval_items"]) & set(ctx["exclude_items"])
        assert set(o["rerank_items"]) <= set(o["rank_items"]) <= set(o["prerank_items"]) <= set(o["retrieval_items"])


def test_mixed_batch_good_answers_equal_single_and_bad_get_errors(tiny_cascade, sample_contexts):
    rt = tiny_cascade.stages["rank"]
    full = tiny_cascade.run(sample_contexts[:3])
    goods = [req(c, candidates=f["prerank_items"]) for c, f in zip(sample_contexts[:3], full)]
    bad_nan = dict(goods[0], request_features=np.array([[np.nan, 0, 0, 0]], np.float32))
    bad_neg = dict(goods[1], candidates=np.array([[5, -2]], np.int64))
    res = rt.run([goods[0], bad_nan, goods[1], bad_neg, goods[2]])
    assert isinstance(res[1], InputError) and "finite" in str(res[1])
    assert isinstance(res[3], InputError) and ">= 0" in str(res[3])
    for got, g in zip([res[0], res[2], res[4]], goods):
        alone = rt.run([g])[0]
        assert isinstance(got, StageResult)
        assert (got.items == alone.items).all()
        np.testing.assert_allclose(got.scores, alone.scores, rtol=1e-5, atol=1e-6)


def test_cold_start_user_and_unknown_items_are_served(tiny_cascade, sample_contexts):
    ctx = dict(sample_contexts[0])
    ctx["user_id"] = np.array([987654321987], np.int64)  # never seen in training
    ctx["history"] = np.array([1, 2, 3], np.int64)  # unknown item ids
    ctx["user_features"] = np.array([1, 5, 999], np.int64)  # unknown country code
    out = tiny_cascade.run([ctx])[0]
    assert isinstance(out, dict) and out["rerank_items"].size == 20


def test_short_candidate_list_is_trimmed(tiny_cascade, sample_contexts):
    full = tiny_cascade.run(sample_contexts[:1])[0]
    cands = full["rank_items"][:7]
    res = tiny_cascade.stages["rerank"].run([req(sample_contexts[0], candidates=cands)])[0]
    assert res.items.shape == (1, 7) and np.isfinite(res.scores).all()
    assert set(res.items[0]) == set(cands)


def test_multi_row_request_equals_single_rows(tiny_cascade, sample_contexts):
    rt = tiny_cascade.stages["rerank"]
    full = tiny_cascade.run(sample_contexts[:2])
    singles = [req(c, candidates=f["rank_items"]) for c, f in zip(sample_contexts[:2], full)]
    h = min(s["history"].shape[1] for s in singles)  # rows of one request share list lengths
    for s in singles:
        s["history"] = s["history"][:, :h]
    two = {k: np.concatenate([s[k] for s in singles]) for k in singles[0]}
    got = rt.run([two])[0]
    for row, s in enumerate(singles):
        assert (got.items[row] == rt.run([s])[0].items[0]).all()


def test_strategy_pages_from_cached_lists(tiny_cascade, sample_contexts):
    """Entering the cascade later on the cached list of the full run gives the same page."""
    ctx = sample_contexts[5]
    full = tiny_cascade.run([ctx])[0]
    for j, cached in ((1, "retrieval_items"), (2, "prerank_items"), (3, "rank_items")):
        out = tiny_cascade.run([ctx], strategy=j, candidates=[full[cached]])[0]
        assert (out["rerank_items"] == full["rerank_items"]).all()


def test_cascade_is_a_recommender(tiny_model_set):
    q = json.loads((tiny_model_set / "quality.json").read_text())
    for s in STAGES:
        r = q["recall"][s]
        assert r["cascade"] > 2 * r["random"], (s, r)
    c = q["expected_clicks_per_page"]
    assert c["cascade"] > 2 * c["random"]
    assert c["oracle"] > c["cascade"]


def test_cost_profile_is_measured_and_normalised(tiny_model_set):
    prof = json.loads((tiny_model_set / "cost_profile.json").read_text())
    c = {int(k): v for k, v in prof["strategy_cost"].items()}
    assert c[0] == pytest.approx(1.0)
    assert c[0] > c[1] > c[2] > c[3] > 0
    share = prof["share_of_full_cascade"]
    assert max(share, key=share.get) == "rank"  # ranking dominates, as in production


def test_strategy_costs_closed_form():
    c = strategy_costs({"retrieval": 1.0, "prerank": 1.0, "rank": 6.0, "rerank": 2.0})
    assert c == {0: 1.0, 1: 0.9, 2: 0.8, 3: 0.2}
