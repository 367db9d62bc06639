"""``python -m comrecycle.serving.server``: serve a model repository in the foreground until
Ctrl-C / SIGTERM (see --help)."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from ..errors import ComRecycleError
from .server import TritonServer
from .triton_env import DEFAULT_EXIT_TIMEOUT_S, LOCALHOST, MODEL_CONTROL_MODES

LOG = logging.getLogger("comrecycle.serving.server")


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

class _Terminate(BaseException):
    """Raised by :func:`main`'s signal handler while the server is starting up.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that no ``except Exception`` on the way
    (logging, urllib) can swallow it.
    """


def _parse_port(text: str) -> Optional[int]:
    value = int(text)
    if value == 0:
        return None
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"expected a port in 1..65535 (or 0 = free port), got {text}")
    return value


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m comrecycle.serving.server",
        description="Run the embedded Triton Inference Server (from nvidia-pytriton) on a model "
                    "repository, in the foreground until Ctrl-C or SIGTERM.",
        epilog="Arguments after '--' are passed to tritonserver unchanged.",
    )
    parser.add_argument("--model-repository", required=True, type=Path, help="model repository folder")
    parser.add_argument("--http-port", type=_parse_port, default=8000, help="HTTP port (default 8000; 0 = free port)")
    parser.add_argument("--grpc-port", type=_parse_port, default=8001, help="gRPC port (default 8001; 0 = free port)")
    parser.add_argument("--metrics-port", type=_parse_port, default=8002,
                        help="Prometheus metrics port (default 8002; 0 = free port)")
    parser.add_argument("--address", default=LOCALHOST, help=f"interface to bind (default {LOCALHOST})")
    parser.add_argument("--model-control", choices=MODEL_CONTROL_MODES, default="none",
                        help="'none': load all models at start; 'explicit': only --load-model ones")
    parser.add_argument("--load-model", action="append", default=[], metavar="NAME",
                        help="model loaded at start-up with --model-control explicit (repeatable)")
    parser.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level")
    parser.add_argument("--log-file", type=Path, default=None,
                        help="file for Triton's output (default: a temporary file)")
    parser.add_argument("--exit-timeout", type=int, default=DEFAULT_EXIT_TIMEOUT_S,
                        help="seconds Triton lets in-flight requests finish on shutdown "
                             f"(default {DEFAULT_EXIT_TIMEOUT_S})")
    parser.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for readiness")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Ctrl-C and SIGTERM: during start-up abort it; once serving, just note the request and let
    # the main loop stop the server (never raise at an arbitrary point of a running program).
    state = {"started": False, "signal": None, "signum": 0}

    def _on_signal(signum, frame):
        state["signal"] = signal.Signals(signum).name
        state["signum"] = signum
        if not state["started"]:
            raise _Terminate()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    server: Optional[TritonServer] = None
    try:
        server = TritonServer(
            args.model_repository, args.http_port, args.grpc_port, args.metrics_port,
            model_control=args.model_control, load_models=args.load_model, log_verbose=args.log_verbose,
            log_file=args.log_file, extra_args=extra, startup_timeout=args.startup_timeout,
            address=args.address, exit_timeout=args.exit_timeout,
        )
        server.start()
        state["started"] = True
    except (ComRecycleError, FileNotFoundError) as exc:
        LOG.error("%s", exc)
        return 1
    except _Terminate:
        LOG.info("%s during start-up: stopping", state["signal"])
        if server is not None:
            server.stop()
        return 128 + state["signum"]
    LOG.info("serving %s: HTTP %s | gRPC %s | metrics %s | log %s | Ctrl-C or SIGTERM to stop",
             server.model_repository, server.http_url, server.grpc_url, server.metrics_endpoint,
             server.log_path)
    while server.is_running() and state["signal"] is None:
        time.sleep(0.2)
    if state["signal"] is not None:
        LOG.info("%s: shutting down", state["signal"])
        status = 0
    else:
        LOG.error("tritonserver exited unexpectedly (code %s); last lines of its log:\n%s",
                  server._process.poll() if server._process else "?", server.log_tail())
        status = 1
    server.stop()
    LOG.info("stopped")
    return status


if __name__ == "__main__":
    sys.exit(main())
