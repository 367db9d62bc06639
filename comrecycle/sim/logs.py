"""The request log (docs/contracts.md): one Parquet row per request.

Contract columns are fixed; the simulator adds `expected_reward` (the served page's exact
expected clicks), `page_items`, `clicked_items` and `n_viewed` which model training uses.
Optional columns: `q_0..q_K` (ground truth) and `cache_state` (fixed-size list of K*3 float32,
specs.CACHE_STATE: the cache as the request filter saw it before serving), written by a
recycling server; the router logs the same `cache_state`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..specs import CACHE_STATE
from ..errors import UserError

LOG_SCHEMA = pa.schema([
    ("request_id", pa.int64()), ("user_id", pa.int64()), ("session_id", pa.int64()),
    ("ts", pa.float64()), ("page", pa.int16()), ("is_repeat", pa.bool_()),
    ("gender", pa.int8()), ("age", pa.int8()), ("country", pa.int16()),
    ("secs_since_prev", pa.float32()), ("prev_exposures", pa.int32()), ("prev_clicks", pa.int32()),
    ("history", pa.list_(pa.int64())), ("strategy", pa.int8()), ("propensity", pa.float32()),
    ("reward", pa.float32()), ("cost", pa.float32()),
])
CONTRACT_COLUMNS = tuple(LOG_SCHEMA.names)
SIM_SCHEMA = pa.schema(list(LOG_SCHEMA) + [
    ("expected_reward", pa.float32()), ("n_viewed", pa.int16()),
    ("page_items", pa.list_(pa.int64())), ("clicked_items", pa.list_(pa.int64())),
])


CACHE_STATE_COLUMN = pa.field("cache_state", pa.list_(pa.float32(), CACHE_STATE.dims[0]))


def q_columns(k: int) -> list[str]:
    return [f"q_{j}" for j in range(k)]


class LogBuilder:
    """Collects (batch, outcome) pairs; `table()` returns them sorted by ts."""

    def __init__(self):
        self._cols: dict[str, list] = {n: [] for n in SIM_SCHEMA.names}
        self._q: list[np.ndarray] = []
        self._cache_state: list[np.ndarray] = []

    def add(self, batch, outcome, strategy: np.ndarray | int = 0,
            propensity: np.ndarray | float = 1.0, cost: np.ndarray | float = 1.0,
            q: np.ndarray | None = None, cache_state: np.ndarray | None = None) -> None:
        """q: [B, K+1] ground-truth expected clicks of each strategy (NaN = not available);
        cache_state: [B, K*3] (specs.CACHE_STATE)."""
        B = len(batch)
        c = self._cols
        for name, val, store in (("q_j", q, self._q), ("cache_state", cache_state, self._cache_state)):
            if val is not None:
                store.append(np.asarray(val, np.float32))
            elif store:
                raise UserError(f"{name} columns must be given for every batch or for none")
        c["request_id"].append(batch.request_id)
        c["user_id"].append(batch.user_id)
        c["session_id"].append(batch.session_id)
        c["ts"].append(batch.ts)
        c["page"].append(batch.page)
        c["is_repeat"].append(batch.is_repeat)
        c["gender"].append(batch.user_features[:, 0])
        c["age"].append(batch.user_features[:, 1])
        c["country"].append(batch.user_features[:, 2])
        c["secs_since_prev"].append(batch.secs_since_prev)
        c["prev_exposures"].append(batch.prev_exposures)
        c["prev_clicks"].append(batch.prev_clicks)
        c["history"].extend(batch.history_of(i) for i in range(B))
        c["strategy"].append(np.broadcast_to(np.asarray(strategy, np.int8), (B,)))
        c["propensity"].append(np.broadcast_to(np.asarray(propensity, np.float32), (B,)))
        c["reward"].append(outcome.clicks.astype(np.float32))
        c["cost"].append(np.broadcast_to(np.asarray(cost, np.float32), (B,)))
        c["expected_reward"].append(outcome.expected_clicks)
        c["n_viewed"].append(outcome.n_viewed)
        c["page_items"].extend(outcome.page_items)
        c["clicked_items"].extend(outcome.clicked_items)

    def __len__(self) -> int:
        return int(sum(a.size for a in self._cols["request_id"]))

    def table(self) -> pa.Table:
        arrays = []
        for f in SIM_SCHEMA:
            vals = self._cols[f.name]
            if pa.types.is_list(f.type):
                arrays.append(pa.array([np.asarray(v, np.int64) for v in vals], type=f.type))
            else:
                arrays.append(pa.array(np.concatenate(vals) if vals else [], type=f.type))
        t = pa.Table.from_arrays(arrays, schema=SIM_SCHEMA)
        if self._q:
            q = np.concatenate(self._q)
            for j, name in enumerate(q_columns(q.shape[1])):
                t = t.append_column(pa.field(name, pa.float32()), pa.array(q[:, j], pa.float32()))
        if self._cache_state:
            cs = np.concatenate(self._cache_state)
            t = t.append_column(CACHE_STATE_COLUMN, pa.FixedSizeListArray.from_arrays(
                pa.array(cs.reshape(-1), pa.float32()), cs.shape[1]))
        return t.sort_by([("ts", "ascending"), ("request_id", "ascending")])


def write_log(table: pa.Table, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def read_log(path: str | Path, require_sim_columns: bool = False) -> pa.Table:
    """Read a request log and check the contract columns and types (clear error otherwise)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"request log {path} does not exist")
    table = pq.read_table(path)
    expected = SIM_SCHEMA if require_sim_columns else LOG_SCHEMA
    missing = [n for n in expected.names if n not in table.column_names]
    if missing:
        raise UserError(f"{path}: missing columns {missing}; expected the request-log schema of docs/contracts.md#request-log-schema "
                         f"{list(expected.names)}")
    wrong = [f"{f.name}: expected {f.type}, got {table.schema.field(f.name).type}"
             for f in expected if table.schema.field(f.name).type != f.type]
    if wrong:
        raise UserError(f"{path}: wrong column types: " + "; ".join(wrong))
    return table


# ---- row fingerprints: which rows an estimator was trained on (cross-fitting checks) ----------------
ROW_KEY_COLUMNS = ("user_id", "session_id", "page", "ts")
ROW_SAMPLE = 512


def row_keys(table) -> np.ndarray:
    """[n] uint64 fingerprint of each logged request (user, session, page, timestamp)."""
    h = np.full(table.num_rows, 0x9E3779B97F4A7C15, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for col in ROW_KEY_COLUMNS:
            v = table[col].to_numpy()
            v = v.astype(np.float64).view(np.uint64) if v.dtype.kind == "f" else v.astype(np.int64).view(np.uint64)
            h ^= v + np.uint64(0x9E3779B97F4A7C15) + (h << np.uint64(6)) + (h >> np.uint64(2))
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(31)
    return h


def training_row_sample(table, size: int = ROW_SAMPLE, seed: int = 0) -> list[int]:
    """A fixed-size sample of the training rows' keys, stored in the estimator's manifest."""
    keys = row_keys(table)
    if len(keys) > size:
        keys = np.random.default_rng(seed).choice(keys, size, replace=False)
    return [int(k) for k in keys]


def in_sample_share(table, sample: list[int]) -> float:
    """Share of the estimator's sampled training rows that are in this log (0 = held out)."""
    if not sample:
        return 0.0
    return float(np.isin(np.asarray(sample, dtype=np.uint64), row_keys(table)).mean())
