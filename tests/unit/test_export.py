"""ONNX export: checker-valid, raw-id inputs, and numerically equal to PyTorch."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from comrecycle.models.export import export_stage, index_inputs, onnx_io_summary
from comrecycle.models.nets import PreRank, Rank, ReRank, Retrieval
from comrecycle.models.vocab import OOV_INDEX, PAD_INDEX, Vocab
from comrecycle.runtime.stage import pad_lists
from comrecycle.specs import CascadeSizes, stage_specs

N_ITEMS, N_USERS = 300, 40
SIZES = CascadeSizes(60, 30, 15, 5)
rng = np.random.default_rng(0)
ITEM_IDS = np.sort(rng.choice(10**9, N_ITEMS, replace=False)).astype(np.int64) + 10**6
USER_IDS = np.sort(rng.choice(10**6, N_USERS, replace=False)).astype(np.int64)
CATEGORY = rng.integers(0, 7, N_ITEMS)


def build(stage):
    torch.manual_seed(1)
    cat = torch.from_numpy(CATEGORY)
    return {"retrieval": lambda: Retrieval(N_USERS, torch.from_numpy(ITEM_IDS), cat, 8, SIZES.retrieval),
            "prerank": lambda: PreRank(N_USERS, cat, 8, SIZES.prerank),
            "rank": lambda: Rank(N_USERS, cat, 8, SIZES.rank, (16, 8), 8, 3),
            "rerank": lambda: ReRank(N_USERS, cat, 8, SIZES.rerank)}[stage]().eval()


def requests(stage, lengths):
    """Raw-id requests with cold-start users/items and variable-length lists."""
    reqs = []
    for n in lengths:
        hist = rng.choice(ITEM_IDS, 4)
        hist[0] = 123  # an item id never seen: cold start, not an error
        r = {"user_id": np.array([[USER_IDS[3] if n % 2 else 999_999_999]]),  # unknown user
             "user_features": np.array([[1, 9, 400]]),  # out-of-range codes -> unknown bucket
             "history": hist[None], "request_features": np.array([[12.5, 2, 7, 1]], np.float32)}
        if stage == "retrieval":
            r["exclude_items"] = rng.choice(ITEM_IDS, n)[None]
        else:
            c = rng.choice(ITEM_IDS, n, replace=False)
            r["candidates"] = c[None]
        reqs.append(r)
    return reqs


def pack(reqs):
    return {k: pad_lists([r[k] for r in reqs]) if k in ("history", "exclude_items", "candidates")
            else np.concatenate([r[k] for r in reqs]).astype(np.float32 if k == "request_features" else np.int64)
            for k in reqs[0]}


@pytest.mark.parametrize("stage", ["retrieval", "prerank", "rank", "rerank"])
def test_onnx_matches_torch(stage, tmp_path):
    spec = stage_specs(SIZES)[stage]
    uv, iv = Vocab(USER_IDS), Vocab(ITEM_IDS)
    model = build(stage)
    path = export_stage(model, spec, uv, iv, tmp_path / f"{stage}.onnx")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    io = onnx_io_summary(path)
    assert [i[0] for i in io["inputs"]] == [t.name for t in spec.inputs]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # batch 1 and a ragged batch of 3 whose lists are shorter than top_k for one request
    for lengths in ([12], [3, 40, 17]):
        packed = pack(requests(stage, lengths))
        o_items, o_scores = sess.run([o.name for o in spec.outputs], packed)
        with torch.no_grad():
            t_items, t_scores = model(*index_inputs(stage, packed, uv, iv))
        assert o_items.shape == (len(lengths), spec.top_k)
        assert (o_items == t_items.numpy()).all()
        fin = np.isfinite(o_scores)
        assert (fin == np.isfinite(t_scores.numpy())).all()
        np.testing.assert_allclose(o_scores[fin], t_scores.numpy()[fin], rtol=1e-4, atol=1e-5)
        if stage != "retrieval":
            # never an item that was not a candidate; padding only where the list was short
            for row, n in enumerate(lengths):
                real = o_items[row][fin[row]]
                assert set(real) <= set(packed["candidates"][row][:n])
                assert fin[row].sum() == min(n, spec.top_k)
        else:
            for row in range(len(lengths)):
                assert not set(o_items[row]) & set(packed["exclude_items"][row])


def test_label_encoder_matches_vocab(tmp_path):
    from onnx import TensorProto, helper

    v = Vocab(ITEM_IDS)
    node = v.label_encoder("x", "y", "enc")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.INT64, [None])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [None])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 2)])
    x = np.concatenate([ITEM_IDS[:5], [-1, 5, 10**12]]).astype(np.int64)
    y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert (y == v.index(x)).all()
    assert y[5] == PAD_INDEX and y[6] == OOV_INDEX and y[7] == OOV_INDEX
