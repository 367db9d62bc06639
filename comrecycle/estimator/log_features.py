"""The request-log side of the effect-loss estimator: the columns a training log must have,
its checks (clear errors), and the served-tensor arrays of its rows."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ..errors import UserError
from ..models.train import _list_matrix
from ..sim.logs import LOG_SCHEMA
from ..specs import CACHE_STATE, HISTORY_MAX, N_RECYCLE

TRAIN_COLUMNS = ("session_id", "page", "is_repeat", "gender", "age", "country", "secs_since_prev",
                 "prev_exposures", "prev_clicks", "history", "strategy", "propensity", "reward")


class LogError(UserError):
    """A training log that cannot be used, with what was expected and what arrived."""


def validate_training_log(table: pa.Table, where: str = "log") -> None:
    missing = [c for c in TRAIN_COLUMNS if c not in table.column_names]
    if missing:
        raise LogError(f"{where}: missing columns {missing}; expected the request-log schema of docs/contracts.md#request-log-schema")
    wrong = [f"{c}: expected {LOG_SCHEMA.field(c).type}, got {table.schema.field(c).type}"
             for c in TRAIN_COLUMNS if table.schema.field(c).type != LOG_SCHEMA.field(c).type]
    if wrong:
        raise LogError(f"{where}: wrong column types: " + "; ".join(wrong))
    p = table["propensity"].to_numpy()
    bad = ~((p > 0) & (p <= 1))
    if bad.any():
        raise LogError(f"{where}: propensities must be in (0, 1]; got {int(bad.sum())} outside, e.g. "
                       f"{float(p[bad][0])}")
    y = table["reward"].to_numpy()
    if not np.isfinite(y).all():
        raise LogError(f"{where}: reward has {int((~np.isfinite(y)).sum())} NaN/inf values")
    rep = table["is_repeat"].to_numpy()
    s = table["strategy"].to_numpy()
    if not rep.any() or (s[rep] == 0).all() or len(np.unique(s[rep])) < 2:
        raise LogError(f"{where}: no randomised rows: repeated requests must carry several strategies "
                       f"(got strategies {sorted(set(s[rep].tolist()))} on {int(rep.sum())} repeated "
                       f"requests); write one with `comrecycle simulate --logging random`")
    if (s < 0).any() or (s > N_RECYCLE).any():
        raise LogError(f"{where}: strategy must be in 0..{N_RECYCLE}, got {sorted(set(s.tolist()))}")
    if has_cache_state(table):
        try:
            cs = cache_state_from_log(table)
        except LogError as e:
            raise LogError(f"{where}: {e}") from None
        if not np.isfinite(cs).all():
            raise LogError(f"{where}: cache_state has {int((~np.isfinite(cs)).any(1).sum())} rows with NaN/inf")


def has_cache_state(table: pa.Table) -> bool:
    return "cache_state" in table.column_names


def cache_state_from_log(table: pa.Table) -> np.ndarray:
    """[n, 3K] float32; -1 (absent) everywhere when the log has no `cache_state` column."""
    width = CACHE_STATE.dims[0]
    if not has_cache_state(table):
        return np.full((table.num_rows, width), -1.0, np.float32)
    col = table["cache_state"].combine_chunks()
    if not pa.types.is_fixed_size_list(col.type) or col.type.list_size != width:
        raise LogError(f"cache_state: expected fixed_size_list<float32>[{width}], got {col.type}")
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)


def features_from_log(table: pa.Table) -> dict[str, np.ndarray]:
    """Served-tensor arrays (raw ids, batch first) from log rows."""
    col = lambda n: table[n].to_numpy()  # noqa: E731
    return {
        "cache_state": cache_state_from_log(table),
        "user_features": np.stack([col("gender"), col("age"), col("country")], 1).astype(np.int64),
        "history": _list_matrix(table["history"], HISTORY_MAX),
        "request_features": np.stack([col("secs_since_prev"), col("page").astype(np.float32),
                                      col("prev_exposures").astype(np.float32),
                                      col("prev_clicks").astype(np.float32)], 1).astype(np.float32),
    }
