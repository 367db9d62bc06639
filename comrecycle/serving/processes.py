"""Ports, process groups and log tails for the servers this package launches (tritonserver,
redis-server): free loopback ports, children that die with their parent, and the lines of a
log that say why a start failed."""
from __future__ import annotations

import ctypes
import errno
import os
import re
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Iterable, List


from .triton_env import LOCALHOST, LOG_TAIL_LINES


# --------------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------------

def find_free_port(host: str = LOCALHOST, exclude: Iterable[int] = ()) -> int:
    """Return a TCP port on ``host`` that is free right now (the OS picks it)."""
    excluded = set(exclude)
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port not in excluded:
            return port
    raise RuntimeError(f"could not find a free port on {host} outside {sorted(excluded)}")


def port_is_free(port: int, host: str = LOCALHOST) -> bool:
    """True when a server could bind ``host:port`` now (SO_REUSEADDR, as servers do, so a
    port in TIME_WAIT counts as free while a listening socket does not)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


# --------------------------------------------------------------------------------------------
# Process groups and logs
# --------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _death_signal_preexec():
    """A ``preexec_fn`` asking the kernel to SIGTERM tritonserver when its parent dies.

    This covers a parent killed without running ``atexit`` (SIGKILL, default SIGTERM). Only
    used when spawning from the main thread: the kernel ties the death signal to the thread
    that forked, so a worker thread's exit would otherwise stop the server.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover
        return None
    sig = int(signal.SIGTERM)

    def _preexec() -> None:  # runs in the child between fork and exec: keep it trivial
        prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return _preexec


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - the id was reused by someone else's group
        return False
    return True


def _read_tail(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 256 * 1024) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError as exc:
        return f"<could not read {path}: {exc}>"
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


_ERROR_LINE = re.compile(r"^E\d{4} |failed to load|error:|Traceback", re.IGNORECASE)
# Errors every CPU-only start logs (no CUDA driver, no NVML/DCGM): not worth showing.
_BENIGN_ERROR = re.compile(r"CudaDriverHelper has not been initialized|NVML|DCGM|CUDA driver version")


def _error_lines(path: Path, limit: int = 20) -> List[str]:
    """Triton's error lines (``E0101 ...``, ``failed to load ...``) from the whole log."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    found = [line for line in text.splitlines()
             if _ERROR_LINE.search(line) and not _BENIGN_ERROR.search(line)]
    return found[:limit]
