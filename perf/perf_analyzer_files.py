"""perf_analyzer's files: the ``--input-data`` JSON it cycles through, the ``-f`` CSV report it
writes (parsed into one row per concurrency level; columns in perf.perf_analyzer_run's docstring),
and our CSV and text tables of those rows."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from comrecycle.errors import ServingFailure

# perf_analyzer CSV column -> our row key (values in microseconds except the throughput)
CSV_COLUMNS = {
    "Concurrency": "concurrency",
    "Inferences/Second": "throughput_infer_per_s",
    "p50 latency": "p50_us",
    "p90 latency": "p90_us",
    "p95 latency": "p95_us",
    "p99 latency": "p99_us",
    "Avg latency": "avg_us",
    "Client Send": "client_send_us",
    "Network+Server Send/Recv": "network_server_send_recv_us",
    "Server Queue": "server_queue_us",
    "Server Compute Input": "server_compute_input_us",
    "Server Compute Infer": "server_compute_infer_us",
    "Server Compute Output": "server_compute_output_us",
    "Client Recv": "client_recv_us",
    "request/response": "client_send_recv_us",
    "response wait": "response_wait_us",
}
REQUIRED_CSV_COLUMNS = ("Concurrency", "Inferences/Second", "p50 latency", "p90 latency",
                        "p95 latency", "p99 latency", "Avg latency")
ROW_FIELDS = ["label", "model", "protocol", "concurrency", "batch_size",
              *[v for k, v in CSV_COLUMNS.items() if k != "Concurrency"]]


class PerfAnalyzerError(ServingFailure):
    """perf_analyzer failed, timed out or wrote no usable report; the message has its output tail."""


# --------------------------------------------------------------------------------------------
# Input data
# --------------------------------------------------------------------------------------------

def _tensor_entry(name: str, value: Any, index: int) -> Dict[str, Any]:
    arr = np.asarray(value)
    if arr.dtype == object or arr.dtype.kind in "US":
        content = [v.decode() if isinstance(v, bytes) else str(v) for v in arr.ravel().tolist()]
    elif arr.dtype.kind in "biuf":
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ValueError(f"request {index}, tensor {name!r}: expected finite numbers "
                             "(JSON has no NaN/Inf), got non-finite values")
        content = arr.ravel().tolist()
    else:
        raise ValueError(f"request {index}, tensor {name!r}: expected a numeric, bool or string "
                         f"array, got dtype {arr.dtype}")
    if arr.ndim == 0:
        raise ValueError(f"request {index}, tensor {name!r}: expected an array with the model's "
                         f"dims (no batch dimension), e.g. np.array([{content[0]!r}]), got a scalar")
    return {"content": content, "shape": [int(d) for d in arr.shape]}


def write_input_data(path: Union[str, Path], requests: Sequence[Mapping[str, Any]],
                     validation: Optional[Sequence[Mapping[str, Any]]] = None) -> Path:
    """Write a perf_analyzer ``--input-data`` JSON file; perf_analyzer cycles through it.

    Args:
        path: file to write.
        requests: one dict per request, ``{tensor_name: array}``, each array shaped like the
            model's dims *without* the batch dimension (``user_id`` with dims [1]:
            ``np.array([42])``). Variable-length inputs may differ in shape per request: every
            entry carries its own ``content`` (row-major, flattened) and ``shape``, the format of
            perf_analyzer's docs/input_data.md::

                {"data": [{"user_id": {"content": [42], "shape": [1]},
                           "history": {"content": [7, 9, 3], "shape": [3]}}, ...]}
        validation: optional expected outputs, aligned with ``requests``
            (``"validation_data"``: perf_analyzer then checks every response).
    """
    if not requests:
        raise ValueError("expected at least one request for the input data, got none")
    names = set(requests[0])
    data = []
    for i, req in enumerate(requests):
        if set(req) != names:
            raise ValueError(f"request {i}: expected the tensors {sorted(names)} of request 0, "
                             f"got {sorted(req)} (perf_analyzer needs every input in every entry)")
        data.append({name: _tensor_entry(name, value, i) for name, value in req.items()})
    doc: Dict[str, Any] = {"data": data}
    if validation is not None:
        if len(validation) != len(requests):
            raise ValueError(f"expected one validation entry per request ({len(requests)}), "
                             f"got {len(validation)}")
        doc["validation_data"] = [{n: _tensor_entry(n, v, i) for n, v in val.items()}
                                  for i, val in enumerate(validation)]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc))
    return out


def _number(text: str, column: str, csv_path: Path) -> Union[int, float]:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise PerfAnalyzerError(f"expected a number in column {column!r} of {csv_path}, got {text!r}") from None
    return int(value) if value.is_integer() and column != "Inferences/Second" else value


def snake_case(column: str) -> str:
    return re.sub(r"[^0-9a-z]+", "_", column.lower()).strip("_")


def parse_perf_csv(csv_path: Union[str, Path]) -> List[Dict[str, Any]]:
    """Parse a perf_analyzer ``-f`` CSV (``--verbose-csv``) into rows keyed like :data:`ROW_FIELDS`.

    Columns this module does not know are kept under a snake_case name.
    """
    csv_path = Path(csv_path)
    with open(csv_path, newline="") as fh:
        text = fh.read()
    # The latency table comes first; with --collect-metrics a server-metrics table follows
    # after a blank line.
    table = text.strip().split("\n\n")[0]
    reader = csv.DictReader(table.splitlines())
    missing = [c for c in REQUIRED_CSV_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise PerfAnalyzerError(f"expected columns {missing} in perf_analyzer's CSV {csv_path}, "
                                f"got {reader.fieldnames}")
    rows = []
    for raw in reader:
        row: Dict[str, Any] = {}
        for column, value in raw.items():
            if column is None or value in (None, ""):
                continue
            row[CSV_COLUMNS.get(column, snake_case(column))] = _number(value, column, csv_path)
        rows.append(row)
    return rows


def write_rows_csv(rows: Iterable[Mapping[str, Any]], path: Union[str, Path]) -> Path:
    """Write rows (from one or several :func:`run_perf` calls) to one CSV file.

    Columns: :data:`ROW_FIELDS` first, then any other keys in order of appearance.
    """
    rows = list(rows)
    fields = list(ROW_FIELDS)
    for row in rows:
        fields += [k for k in row if k not in fields]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return out


def format_rows(rows: Sequence[Mapping[str, Any]]) -> str:
    """A small fixed-width table of the main numbers."""
    head = f"{'model':<22} {'proto':<5} {'conc':>4} {'infer/s':>10} {'p50 us':>8} {'p90 us':>8} {'p99 us':>8} {'avg us':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{str(r['model']):<22} {r['protocol']:<5} {r['concurrency']:>4} "
                     f"{r['throughput_infer_per_s']:>10.1f} {r['p50_us']:>8} {r['p90_us']:>8} "
                     f"{r['p99_us']:>8} {r['avg_us']:>8}")
    return "\n".join(lines)
