"""The single source of truth for every served tensor: names, dtypes, dims and value rules.

Imported by the ONNX exporter, the config.pbtxt generator, every model.py, the in-process
cascade, the clients and the perf input data. Dims exclude the batch dimension; -1 is a
variable-length list (allowed ragged in the dynamic batcher, padded with PAD_ID internally).

Ids are INT64 everywhere (never BYTES). Ids the models have not seen in training are not
errors: they are served as a cold start (out-of-vocabulary embedding).

Padding: a request with batch size > 1 must send id lists as one dense [batch, n] tensor, so
its rows may end with PAD_ID (-1); a -1 is padding only at the end of a row (a -1 followed by
an id is an error). A request of batch size 1 never needs it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PAD_ID = -1  # internal padding of variable-length id lists; never valid on the wire
HISTORY_MAX = 50  # clicked item ids, most recent first
EXCLUDE_MAX = 2000  # items already exposed in the session
USER_FEATURE_NAMES = ("gender", "age", "country")
# the codes of user_features: gender in [0, 2), age bucket in [0, 6), country in [0, 20); the
# models embed one more code for 'unknown' (out-of-range codes are clamped to it)
N_GENDERS, N_AGES, N_COUNTRIES = 2, 6, 20
REQUEST_FEATURE_NAMES = ("secs_since_prev", "page", "prev_exposures", "prev_clicks")

STAGES = ("retrieval", "prerank", "rank", "rerank")
STRATEGIES = {0: "full", 1: "reuse-retrieval", 2: "reuse-prerank", 3: "reuse-rank"}
# strategy j enters the cascade at STAGES[j]; it reads the cached output of STAGES[j-1]
STRATEGY_ENTRY_STAGE = {0: "retrieval", 1: "prerank", 2: "rank", 3: "rerank"}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a served model (dims exclude the batch dim)."""

    name: str
    dtype: str  # numpy dtype name: "int64" | "float32" | "float64"
    dims: tuple[int, ...]
    doc: str
    min_len: int = 0  # for variable-length lists
    max_len: int | None = None
    nonnegative: bool = False  # ids and categorical codes
    finite: bool = False  # floats: NaN/inf rejected
    optional: bool = False  # may be left out of a request (config `optional: true`)

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def triton_dtype(self) -> str:
        return {"int64": "TYPE_INT64", "float32": "TYPE_FP32", "float64": "TYPE_FP64"}[self.dtype]

    @property
    def wire_dtype(self) -> str:
        """Datatype string of the KServe v2 protocol (tritonclient)."""
        return {"int64": "INT64", "float32": "FP32", "float64": "FP64"}[self.dtype]

    @property
    def variable(self) -> bool:
        return -1 in self.dims


# ---- request context, the same for every stage -------------------------------------------
USER_ID = TensorSpec("user_id", "int64", (1,), "user id (any int64 >= 0; unseen ids are cold starts)",
                     nonnegative=True)
USER_FEATURES = TensorSpec("user_features", "int64", (3,),
                           "gender, age bucket, country code (>= 0; out-of-range codes -> unknown)",
                           nonnegative=True)
HISTORY = TensorSpec("history", "int64", (-1,), f"clicked item ids, most recent first, <= {HISTORY_MAX}",
                     min_len=0, max_len=HISTORY_MAX, nonnegative=True)
REQUEST_FEATURES = TensorSpec("request_features", "float32", (4,),
                              "secs_since_prev (-1 if initial), page (0 = first), "
                              "previous page's exposures (viewed items), previous page's clicks",
                              finite=True)
EXCLUDE_ITEMS = TensorSpec("exclude_items", "int64", (-1,),
                           f"items already exposed to the user in this session (<= {EXCLUDE_MAX})",
                           min_len=0, max_len=EXCLUDE_MAX, nonnegative=True)
CONTEXT = (USER_ID, USER_FEATURES, HISTORY, REQUEST_FEATURES)


def candidates_spec(max_len: int) -> TensorSpec:
    return TensorSpec("candidates", "int64", (-1,), f"candidate item ids (1..{max_len})",
                      min_len=1, max_len=max_len, nonnegative=True)


def items_out(stage: str) -> TensorSpec:
    return TensorSpec(f"{stage}_items", "int64", (-1,), f"{stage} output: item ids, best first")


def scores_out(stage: str) -> TensorSpec:
    return TensorSpec(f"{stage}_scores", "float32", (-1,), f"{stage} output: scores of {stage}_items")


@dataclass(frozen=True)
class StageSpec:
    """A stage model: the context tensors, its candidate input and its top-k output."""

    name: str
    top_k: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...] = field(default=())

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(name)


@dataclass(frozen=True)
class CascadeSizes:
    """Top-k of each stage (a model-set profile decides them)."""

    retrieval: int = 1000
    prerank: int = 300
    rank: int = 100
    rerank: int = 20  # the page size

    def top_k(self, stage: str) -> int:
        return getattr(self, stage)

    def input_len(self, stage: str) -> int:
        """Longest candidate list a stage accepts: the previous stage's top-k."""
        i = STAGES.index(stage)
        return getattr(self, STAGES[i - 1]) if i > 0 else 0


def stage_specs(sizes: CascadeSizes) -> dict[str, StageSpec]:
    specs = {}
    for stage in STAGES:
        inputs = CONTEXT + ((EXCLUDE_ITEMS,) if stage == "retrieval"
                            else (candidates_spec(sizes.input_len(stage)),))
        specs[stage] = StageSpec(stage, sizes.top_k(stage), inputs,
                                 (items_out(stage), scores_out(stage)))
    return specs


@dataclass(frozen=True)
class EnsembleSpec:
    """An ensemble that runs STAGES[first:] ; `entry` is the ensemble input fed as candidates."""

    name: str
    first_stage: str
    entry: TensorSpec | None  # None for the full cascade (retrieval reads exclude_items)

    @property
    def stages(self) -> tuple[str, ...]:
        return STAGES[STAGES.index(self.first_stage):]


def ensemble_specs() -> dict[str, EnsembleSpec]:
    """Ensembles served besides the stages. `rerank` (strategy 3) is the stage model itself."""
    return {
        "cascade": EnsembleSpec("cascade", "retrieval", None),
        "cascade_from_prerank": EnsembleSpec("cascade_from_prerank", "prerank", items_out("retrieval")),
        "cascade_from_rank": EnsembleSpec("cascade_from_rank", "rank", items_out("prerank")),
    }


# Which served model a strategy calls, and which tensor carries the cached candidates.
STRATEGY_MODEL = {0: "cascade", 1: "cascade_from_prerank", 2: "cascade_from_rank", 3: "rerank"}
STRATEGY_CANDIDATES = {0: None, 1: "retrieval_items", 2: "prerank_items", 3: "candidates"}


# ---- the effect-loss estimator (served model `estimator`) --------------------------------------
N_RECYCLE = len(STRATEGIES) - 1  # K
# The state of the user's cache, as the request filter sees it: for each cached list that
# strategy j = 1..K reads (STAGES[j-1]), three numbers. Recycling loses quality mostly as a
# cached list ages and is depleted by exposure, which no request-log feature (docs/contracts.md) shows.
CACHE_STATE_FIELDS = ("age_s", "pages", "items")
CACHE_STATE = TensorSpec("cache_state", "float32", (N_RECYCLE * len(CACHE_STATE_FIELDS),),
                         "per cached list read by strategies 1..K, in that order: seconds since it "
                         "was computed, pages served from it (1 = the page it was computed for), "
                         "items left after removing the viewed ones; -1, -1, -1 where absent or expired",
                         finite=True)
ESTIMATOR_INPUTS = (USER_FEATURES, HISTORY, REQUEST_FEATURES, CACHE_STATE)
ESTIMATOR_OUTPUTS = (
    TensorSpec("q", "float32", (N_RECYCLE + 1,), "predicted effect (expected clicks) of strategies 0..K"),
    TensorSpec("delta_q", "float32", (N_RECYCLE,), "predicted effect loss of strategies 1..K: q_0 - q_j"),
)


# ---- recycle_router: the clients' entry point ---------------------------------------------------
ROUTER = "recycle_router"
PAGE_SIZE = 20
VIEWED_ITEMS = TensorSpec("viewed_items", "int64", (-1,),
                          "items of the previous page the user viewed (exposed), may be empty; they "
                          "leave this user's cached lists and are not served again in the session",
                          min_len=0, max_len=EXCLUDE_MAX, nonnegative=True)
CLICKED_ITEMS = TensorSpec("clicked_items", "int64", (-1,),
                           "items of the previous page the user clicked, may be empty",
                           min_len=0, max_len=EXCLUDE_MAX, nonnegative=True)
REQUEST_TIME = TensorSpec("request_time", "float64", (1,),
                          "optional: request time in seconds (e.g. Unix time) for replays and tests; "
                          "default: the server's clock", finite=True, optional=True)
NEW_SESSION = TensorSpec("new_session", "int64", (1,),
                         "optional: 1 = the client starts a new session (the user's cache is dropped "
                         "and the request is initial); default 0", nonnegative=True, optional=True)
PAGE_TOKEN = TensorSpec("page_token", "int64", (1,),
                        "optional: the page_token the router returned with the page that viewed_items and "
                        "clicked_items describe; default: the user's latest page. Until the feedback of a "
                        "page arrives, its items are held back from recycled pages", nonnegative=True,
                        optional=True)
ROUTER_INPUTS = (USER_ID, USER_FEATURES, HISTORY, VIEWED_ITEMS, CLICKED_ITEMS, REQUEST_TIME, NEW_SESSION, PAGE_TOKEN)


def router_request(user_id: int, user_features, history, viewed=(), clicked=(), *, request_time: float | None = None,
                   new_session: bool = False, page_token: int | None = None) -> dict[str, np.ndarray]:
    """The input tensors of one recycle_router request (no batch dim), typed as ROUTER_INPUTS;
    request_time and page_token are left out when None (the router then uses its clock and the
    user's latest page)."""
    req = {"user_id": np.array([user_id], np.int64), "user_features": np.asarray(user_features, np.int64),
           "history": np.asarray(history, np.int64), "viewed_items": np.asarray(viewed, np.int64),
           "clicked_items": np.asarray(clicked, np.int64), "new_session": np.array([int(new_session)], np.int64)}
    if request_time is not None:
        req["request_time"] = np.array([request_time], np.float64)
    if page_token is not None:
        req["page_token"] = np.array([page_token], np.int64)
    return req


# The strategy score of an unavailable strategy: the lowest float32, not -inf. Triton writes
# -inf as `-Infinity` in JSON responses, which strict JSON parsers (JavaScript, Go, Jackson) and
# perf_analyzer's profile export reject; a finite floor sorts the same.
UNAVAILABLE_SCORE = float(np.finfo(np.float32).min)
ROUTER_OUTPUTS = (
    TensorSpec("page_items", "int64", (-1,), f"the page: up to {PAGE_SIZE} item ids, best first"),
    TensorSpec("page_scores", "float32", (-1,), "re-ranking scores of page_items"),
    TensorSpec("strategy", "int64", (1,), "the strategy that served the page (0..K, see STRATEGIES)"),
    TensorSpec("strategy_scores", "float32", (N_RECYCLE + 1,),
               "-(c_j + λ ΔQ_j) of every strategy; UNAVAILABLE_SCORE (the lowest float32) where "
               "unavailable (all but 0 for initial requests)"),
    TensorSpec("page_token", "int64", (1,),
               "the page's number in the user's session (1 = first): send it back as page_token with the "
               "feedback about this page; 0 = the page was not recorded in the cache (user busy, Redis "
               "unavailable)"),
)
