"""Run Triton's real ``perf_analyzer`` against a running server and collect its numbers.

``perf_analyzer`` ships in the ``tritonclient==2.51.0`` wheel; :func:`run_perf` runs it once per
concurrency level (``--concurrency-range N``), asks for its own CSV report (``-f``, with
``--verbose-csv`` so the average latency is included) and parses it into one row per level:

==============================  =============================================================
``model``, ``protocol``          as given; ``label`` free text to tell runs apart
``concurrency``, ``batch_size``  load point
``throughput_infer_per_s``       inferences per second (requests x batch size)
``p50_us`` ... ``p99_us``        client-side latency percentiles, microseconds
``avg_us``                       client-side average latency
``client_send_us`` ...           perf_analyzer's latency breakdown (client send,
                                 network+server send/recv, server queue, compute
                                 input/infer/output, client recv), microseconds
``client_send_recv_us``          HTTP send/recv or gRPC (un)marshal time
``response_wait_us``             time waiting for the response
==============================  =============================================================

Example (library)::

    from perf.perf_analyzer_run import run_perf, write_input_data, write_rows_csv
    write_input_data("ids.json", [{"user_id": np.array([i])} for i in range(8)])
    rows = run_perf("floor_identity", server.grpc_url, "grpc", [1, 4, 16], input_data="ids.json")
    write_rows_csv(rows, "results.csv")

Example (command line)::

    python -m perf.perf_analyzer_run --model floor_identity --url 127.0.0.1:8001 \\
        --protocol grpc --concurrency 1 4 16 --input-data ids.json --out results.csv
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from comrecycle.serving.server import perf_analyzer_path, tool_env

from .perf_analyzer_files import (ROW_FIELDS, PerfAnalyzerError, format_rows, parse_perf_csv, snake_case,
                                  write_input_data, write_rows_csv)
from comrecycle.errors import ComRecycleError

LOG = logging.getLogger(__name__)

PROTOCOLS = ("grpc", "http")
MEASUREMENT_MODES = ("time_windows", "count_windows")

__all__ = ["PerfAnalyzerError", "ROW_FIELDS", "format_rows", "main", "parse_perf_csv", "run_perf",
           "write_input_data", "write_rows_csv"]


# --------------------------------------------------------------------------------------------
# Running perf_analyzer
# --------------------------------------------------------------------------------------------

def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _hint(output: str) -> str:
    if "error while loading shared libraries" in output:
        return ("\nhint: perf_analyzer needs libb64.so.0d (Debian package libb64-0d) and "
                "libcudart.so.12 (PyPI nvidia-cuda-runtime-cu12; tool_env() puts it on LD_LIBRARY_PATH)")
    if "Failed to obtain stable measurement" in output:
        return ("\nhint: the measurement did not stabilise: raise measurement_interval_ms, "
                "stability_percentage or max_trials, or use request_count")
    if "Couldn't connect" in output or "failed to connect" in output.lower() or "Connection refused" in output:
        return "\nhint: is the server running at that URL, and does the protocol match the port?"
    return ""


def run_perf(
    model: str,
    url: str,
    protocol: str = "grpc",
    concurrency_levels: Sequence[int] = (1, 4, 16),
    *,
    input_data: Optional[Union[str, Path]] = None,
    shape: Sequence[str] = (),
    batch_size: int = 1,
    measurement_interval_ms: int = 1000,
    measurement_mode: str = "time_windows",
    measurement_request_count: Optional[int] = None,
    request_count: Optional[int] = None,
    stability_percentage: Optional[float] = None,
    max_trials: Optional[int] = None,
    percentile: Optional[int] = None,
    async_mode: bool = False,
    timeout_s: float = 600.0,
    csv_out: Optional[Union[str, Path]] = None,
    raw_csv_dir: Optional[Union[str, Path]] = None,
    extra_args: Sequence[str] = (),
    label: str = "",
) -> List[Dict[str, Any]]:
    """Measure ``model`` at ``url`` with perf_analyzer, one invocation per concurrency level.

    Args:
        model: model name.
        url: ``host:port`` of the server's endpoint for ``protocol`` (e.g. ``server.grpc_url``).
        protocol: ``"grpc"`` or ``"http"``.
        concurrency_levels: outstanding requests to keep, e.g. ``[1, 4, 16]``.
        input_data: JSON file from :func:`write_input_data` (default: perf_analyzer's random data).
        shape: ``--shape`` overrides for variable dims, e.g. ``["history:50"]``.
        batch_size: ``-b``.
        measurement_interval_ms: window length (``-p``; default of perf_analyzer: 5000).
        measurement_mode: ``"time_windows"`` or ``"count_windows"`` (then
            ``measurement_request_count`` requests per window).
        request_count: measure exactly this many requests (one window, no stability check).
        stability_percentage, max_trials, percentile: perf_analyzer's ``-s``, ``-r``,
            ``--percentile`` (None = its defaults: 10 %, 10 windows, average latency).
        async_mode: ``--async`` instead of ``--sync``.
        timeout_s: wall-clock limit for the whole call (all levels).
        csv_out: if given, the rows are also written there (see :func:`write_rows_csv`).
        raw_csv_dir: keep perf_analyzer's own CSVs there (default: a temporary folder).
        extra_args: more perf_analyzer arguments.
        label: copied into every row.

    Returns:
        One dict per concurrency level with the keys of :data:`ROW_FIELDS`.

    Raises:
        PerfAnalyzerError: perf_analyzer failed (non-zero exit, unstable measurement, timeout);
            the message holds the command and the tail of its output.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if measurement_mode not in MEASUREMENT_MODES:
        raise ValueError(f"measurement_mode must be one of {MEASUREMENT_MODES}, got {measurement_mode!r}")
    levels = [int(c) for c in concurrency_levels]
    if not levels or any(c < 1 for c in levels):
        raise ValueError(f"expected concurrency levels >= 1, got {list(concurrency_levels)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if input_data is not None and not Path(input_data).is_file():
        raise FileNotFoundError(f"--input-data file {input_data} does not exist")
    for s in shape:
        if not re.fullmatch(r"[^:]+:\d+(,\d+)*", s):
            raise ValueError(f"shape overrides look like 'name:d0,d1,...', got {s!r}")

    binary = str(perf_analyzer_path())
    env = tool_env()
    deadline = time.monotonic() + timeout_s
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="perf_analyzer-") as tmp:
        out_dir = Path(raw_csv_dir) if raw_csv_dir is not None else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        for conc in levels:
            report = out_dir / f"{snake_case(model)}_{protocol}_c{conc}.csv"
            if report.exists():
                report.unlink()
            cmd = [binary, "-m", model, "-u", url, "-i", protocol, "-b", str(batch_size),
                   "--concurrency-range", str(conc), "-f", str(report), "--verbose-csv",
                   "--measurement-interval", str(int(measurement_interval_ms)),
                   "--measurement-mode", measurement_mode,
                   "--async" if async_mode else "--sync"]
            if measurement_request_count is not None:
                cmd += ["--measurement-request-count", str(int(measurement_request_count))]
            if request_count is not None:
                cmd += ["--request-count", str(int(request_count))]
            if stability_percentage is not None:
                cmd += ["--stability-percentage", str(stability_percentage)]
            if max_trials is not None:
                cmd += ["--max-trials", str(int(max_trials))]
            if percentile is not None:
                cmd += ["--percentile", str(int(percentile))]
            if input_data is not None:
                cmd += ["--input-data", str(input_data)]
            for s in shape:
                cmd += ["--shape", s]
            cmd += [str(a) for a in extra_args]

            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PerfAnalyzerError(f"timeout_s={timeout_s} s used up before concurrency {conc} "
                                        f"of {levels} for model {model!r}")
            LOG.info("perf_analyzer: model %s, %s %s, concurrency %d", model, protocol, url, conc)
            LOG.debug("command: %s", shlex.join(cmd))
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=remaining,
                                      stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired as exc:
                out = (exc.stdout or b"")
                out = out.decode(errors="replace") if isinstance(out, bytes) else out
                raise PerfAnalyzerError(
                    f"perf_analyzer did not finish within timeout_s={timeout_s} s (concurrency {conc})\n"
                    f"command: {shlex.join(cmd)}\n--- stdout tail ---\n{_tail(out)}") from None
            output = proc.stdout + "\n" + proc.stderr
            if proc.returncode != 0 or not report.is_file():
                raise PerfAnalyzerError(
                    f"perf_analyzer exited with code {proc.returncode} for model {model!r} at "
                    f"{protocol}://{url}, concurrency {conc} (expected 0 and a CSV report at {report})\n"
                    f"command: {shlex.join(cmd)}\n--- stderr tail ---\n{_tail(proc.stderr)}\n"
                    f"--- stdout tail ---\n{_tail(proc.stdout, 20)}{_hint(output)}")
            parsed = parse_perf_csv(report)
            if len(parsed) != 1 or parsed[0].get("concurrency") != conc:
                raise PerfAnalyzerError(f"expected one row for concurrency {conc} in {report}, got {parsed}")
            row = {"label": label, "model": model, "protocol": protocol, "batch_size": batch_size,
                   **parsed[0]}
            LOG.info("  concurrency %d: %.1f infer/s, p50 %s us, p99 %s us", conc,
                     row["throughput_infer_per_s"], row.get("p50_us"), row.get("p99_us"))
            rows.append({k: row.get(k) for k in ROW_FIELDS} | {k: v for k, v in row.items() if k not in ROW_FIELDS})
    if csv_out is not None:
        write_rows_csv(rows, csv_out)
    return rows


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m perf.perf_analyzer_run",
        description="Run perf_analyzer (tritonclient 2.51.0) against a running Triton server, one "
                    "run per concurrency level, and collect its numbers into one CSV.",
    )
    p.add_argument("--model", required=True, help="model name")
    p.add_argument("--url", required=True, help="server endpoint host:port for the chosen protocol")
    p.add_argument("--protocol", choices=PROTOCOLS, default="grpc", help="default grpc")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], metavar="N",
                   help="concurrency levels (default 1 4 16)")
    p.add_argument("--input-data", type=Path, default=None,
                   help="perf_analyzer input-data JSON (see write_input_data); default random data")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:DIMS",
                   help="shape of a variable-size input, e.g. history:50 (repeatable)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--measurement-interval-ms", type=int, default=1000)
    p.add_argument("--measurement-mode", choices=MEASUREMENT_MODES, default="time_windows")
    p.add_argument("--measurement-request-count", type=int, default=None)
    p.add_argument("--request-count", type=int, default=None,
                   help="measure exactly this many requests per level (no stability check)")
    p.add_argument("--stability-percentage", type=float, default=None)
    p.add_argument("--max-trials", type=int, default=None)
    p.add_argument("--percentile", type=int, default=None)
    p.add_argument("--async", dest="async_mode", action="store_true", help="asynchronous requests")
    p.add_argument("--timeout-s", type=float, default=600.0, help="limit for the whole run")
    p.add_argument("--label", default="", help="free text copied into every row")
    p.add_argument("--out", type=Path, default=None, help="CSV file for the rows")
    p.add_argument("--raw-csv-dir", type=Path, default=None, help="keep perf_analyzer's own CSVs here")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        rows = run_perf(
            args.model, args.url, args.protocol, args.concurrency, input_data=args.input_data,
            shape=args.shape, batch_size=args.batch_size,
            measurement_interval_ms=args.measurement_interval_ms,
            measurement_mode=args.measurement_mode,
            measurement_request_count=args.measurement_request_count,
            request_count=args.request_count, stability_percentage=args.stability_percentage,
            max_trials=args.max_trials, percentile=args.percentile, async_mode=args.async_mode,
            timeout_s=args.timeout_s, csv_out=args.out, raw_csv_dir=args.raw_csv_dir, label=args.label,
        )
    except (ComRecycleError, ValueError, FileNotFoundError) as exc:
        LOG.error("%s", exc)
        return 1
    print(format_rows(rows))
    if args.out:
        print(f"rows written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
