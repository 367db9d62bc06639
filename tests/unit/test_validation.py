"""Per-request input checks name what was expected and what arrived."""
import numpy as np
import pytest

from comrecycle.runtime.validation import InputError, check_request
from comrecycle.specs import CascadeSizes, stage_specs

SPEC = stage_specs(CascadeSizes())["rank"]


def good():
    return {"user_id": np.array([[7]], np.int64), "user_features": np.array([[0, 1, 2]], np.int64),
            "history": np.array([[3, 4]], np.int64), "request_features": np.array([[5.0, 1, 3, 0]], np.float32),
            "candidates": np.arange(10, dtype=np.int64)[None]}


def test_good_request_passes():
    assert check_request("rank", SPEC.inputs, good()) == 1


@pytest.mark.parametrize("name,value,pattern", [
    ("user_id", np.array([[7]], np.int32), r"expected dtype INT64, got int32"),
    ("user_features", np.array([[0, 1]], np.int64), r"expected shape \[batch, 3\], got \[1, 2\]"),
    ("history", np.array([[-3]], np.int64), r"must be >= 0, got -3"),
    ("candidates", np.zeros((1, 0), np.int64), r"at least 1 item id\(s\), got an empty list"),
    ("candidates", np.arange(301, dtype=np.int64)[None], r"at most 300 item ids, got 301"),
    ("history", np.arange(51, dtype=np.int64)[None], r"at most 50 item ids, got 51"),
    ("request_features", np.array([[np.nan, 1, 3, 0]], np.float32), r"expected finite values, got nan"),
    ("request_features", np.array([[np.inf, 1, 3, 0]], np.float32), r"expected finite values, got inf"),
    ("candidates", None, r"missing; expected INT64"),
])
def test_bad_inputs_are_named(name, value, pattern):
    req = good()
    if value is None:
        del req[name]
    else:
        req[name] = value
    with pytest.raises(InputError, match=pattern) as e:
        check_request("rank", SPEC.inputs, req)
    assert f"model 'rank', input '{name}'" in str(e.value)


def test_batch_sizes_must_agree():
    req = good()
    req["user_id"] = np.array([[7], [8]], np.int64)
    with pytest.raises(InputError, match="disagree on the batch size"):
        check_request("rank", SPEC.inputs, req)


def test_rows_of_a_batched_request_may_end_with_padding():
    req = good()
    for k in ("user_id", "user_features", "request_features"):
        req[k] = np.repeat(req[k], 2, axis=0)
    req["history"] = np.array([[3, 4, 5], [6, -1, -1]], np.int64)
    req["candidates"] = np.array([[1, 2, 3], [4, 5, -1]], np.int64)
    assert check_request("rank", SPEC.inputs, req) == 2
    req["candidates"] = np.array([[1, -1, 3], [4, 5, -1]], np.int64)
    with pytest.raises(InputError, match=r"padding \(-1\) is allowed only at the end of a row"):
        check_request("rank", SPEC.inputs, req)
    req["candidates"] = np.array([[1, 2, 3], [-1, -1, -1]], np.int64)  # a row with no candidate
    with pytest.raises(InputError, match=r"at least 1 item id\(s\), got an empty list"):
        check_request("rank", SPEC.inputs, req)
    req["candidates"] = np.array([[1, 2, 3], [4, 5, -2]], np.int64)
    with pytest.raises(InputError, match=r"must be >= 0, got -2"):
        check_request("rank", SPEC.inputs, req)
