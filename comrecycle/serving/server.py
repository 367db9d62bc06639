"""Start and stop the embedded Triton Inference Server that ships in the ``nvidia-pytriton`` wheel.

The wheel carries a complete ``tritonserver`` binary (2.51.0 for nvidia-pytriton 0.7.0), the
Python backend and one backend stub per Python version. This module turns them into a server
that serves a model repository with the *current* Python environment:

* a backend directory ``python/{libtriton_python.so, triton_python_backend_utils.py,
  triton_python_backend_stub}`` is assembled in a cache folder, picking the stub built for the
  running interpreter's version, next to ComRecycle's Python-based backends
  (``comrecycle_stage/model.py`` etc., see comrecycle.serving.backends);
* ``PATH`` starts with this interpreter's ``bin/`` (the stub finds its Python environment by
  looking up ``python3`` on ``PATH``; ``PYTHONPATH`` is ignored by the stub);
* ``LD_LIBRARY_PATH`` holds ``site-packages/nvidia_pytriton.libs`` (the server's own shared
  libraries) and the interpreter's ``LIBDIR`` (so the stub embeds the same libpython).

Typical use::

    from comrecycle.serving.server import TritonServer

    with TritonServer("model_repository") as server:      # free ports on 127.0.0.1
        client = tritonclient.http.InferenceServerClient(server.http_url)
        ...

or from a shell, in the foreground until Ctrl-C / SIGTERM::

    python -m comrecycle.serving.server --model-repository model_repository

Errors: :class:`TritonStartError` when the server does not become ready (its message carries
the command line and the tail of Triton's own log, e.g. ``failed to load 'x' ...``) and
:class:`PortInUseError` when a requested port is taken (raised before anything is spawned).
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import errno
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from .backends import SOURCE_DIR, backend_sources, install_backends
from ..errors import ComRecycleError, ServingFailure, UserError

LOG = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
MODEL_CONTROL_MODES = ("none", "explicit")
DEFAULT_STOP_TIMEOUT_S = 30.0
# Triton's own grace period on shutdown (--exit-timeout-secs; Triton's default is 30). Triton
# also waits this long for idle keep-alive HTTP connections of clients that are still open, so a
# long grace makes every stop() slow; kept well below the stop timeout so a normal shutdown
# finishes before we resort to SIGKILL.
DEFAULT_EXIT_TIMEOUT_S = 5
LOG_TAIL_LINES = 60
NOT_READY_GRACE_S = 3.0  # live but not ready this long after start-up: a model failed to load
_PORT_RACE_ATTEMPTS = 3

__all__ = [
    "PortInUseError",
    "TritonServer",
    "TritonStartError",
    "backend_directory",
    "find_free_port",
    "main",
    "perf_analyzer_path",
    "server_env",
    "tool_env",
    "tritonserver_path",
]


class TritonStartError(ServingFailure):
    """The Triton server could not be started or did not become ready.

    The message names what was expected, what happened, the command line and the tail of
    Triton's log. ``log_path`` and ``command`` are also available as attributes.
    """

    def __init__(self, message: str, *, log_path: Optional[Path] = None,
                 command: Optional[Sequence[str]] = None):
        super().__init__(message)
        self.log_path = log_path
        self.command = list(command) if command is not None else None


class PortInUseError(TritonStartError):
    """A port requested for Triton is already bound by another process (checked before spawning)."""

    def __init__(self, port: int, role: str, address: str = LOCALHOST):
        super().__init__(
            f"{role} port {port} on {address} is already in use: expected a free port for "
            f"tritonserver's {role} endpoint. Pass another port, or None to pick a free one."
        )
        self.port = port
        self.role = role


# --------------------------------------------------------------------------------------------
# Locating the embedded server, its libraries and the tools
# --------------------------------------------------------------------------------------------

def _pytriton_dir() -> Path:
    try:
        import pytriton  # noqa: PLC0415 (imported lazily: only needed to locate files)
    except ImportError as exc:  # pragma: no cover - the package is a hard dependency
        raise TritonStartError(
            "the embedded Triton server comes from the PyPI package nvidia-pytriton, "
            f"which is not importable in {sys.executable}: {exc}"
        ) from exc
    return Path(pytriton.__file__).resolve().parent


def _site_packages() -> Path:
    return _pytriton_dir().parent


def _pytriton_version() -> str:
    try:
        return importlib.metadata.version("nvidia-pytriton")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "unknown"


def tritonserver_path() -> Path:
    """Path of the ``tritonserver`` binary shipped in ``nvidia-pytriton``."""
    path = _pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
    if not path.is_file():
        raise TritonStartError(f"expected the tritonserver binary at {path}; it is missing "
                               "(is nvidia-pytriton installed completely?)")
    return path


def _server_libs_dir() -> Path:
    return _site_packages() / "nvidia_pytriton.libs"


def _python_libdir() -> Optional[str]:
    libdir = sysconfig.get_config_var("LIBDIR")
    return str(libdir) if libdir else None


def _python_bin_dir() -> Path:
    # Not resolved on purpose: a venv's bin/python is a symlink to the base interpreter, and
    # the stub must find the venv's python3 (which makes it use the venv's site-packages).
    return Path(sys.executable).parent


def _cuda_runtime_lib_dir() -> Optional[Path]:
    """``site-packages/nvidia/cuda_runtime/lib`` (PyPI nvidia-cuda-runtime-cu12), if installed."""
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        lib = Path(location) / "lib"
        if lib.is_dir():
            return lib
    return None


def _cache_root() -> Path:
    if os.environ.get("COMRECYCLE_CACHE_DIR"):
        return Path(os.environ["COMRECYCLE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "comrecycle"


def backend_directory(cache_root: Optional[Path] = None) -> Path:
    """Return (building it if needed) a Triton backend directory for the running interpreter.

    Layout: ``<dir>/python/{libtriton_python.so, triton_python_backend_utils.py,
    triton_python_backend_stub}``, copied from the nvidia-pytriton wheel (Triton refuses a
    Python-based backend whose libtriton_python.so resolves outside the backend directory, so
    these are copies, not links), and ``<dir>/<backend>/model.py`` for each of ComRecycle's
    Python-based backends (comrecycle.serving.backends), linked to the package's files so a
    server runs the code of this checkout. The folder name carries the nvidia-pytriton version,
    the Python version and a hash of the wheel's and the package's locations, so two
    environments or two checkouts never share one. The build is atomic (temporary folder +
    rename), hence safe when several processes start at once.
    """
    pytriton_dir = _pytriton_dir()
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    src_backend = pytriton_dir / "tritonserver" / "backends" / "python"
    stubs_dir = pytriton_dir / "tritonserver" / "python_backend_stubs"
    stub = stubs_dir / py / "triton_python_backend_stub"
    if not stub.is_file():
        available = sorted(p.name for p in stubs_dir.iterdir()) if stubs_dir.is_dir() else []
        raise TritonStartError(
            f"expected a Python-backend stub for Python {py} at {stub}; nvidia-pytriton "
            f"{_pytriton_version()} ships stubs for: {', '.join(available) or 'none'}"
        )
    wanted = {
        "libtriton_python.so": src_backend / "libtriton_python.so",
        "triton_python_backend_utils.py": src_backend / "triton_python_backend_utils.py",
        "triton_python_backend_stub": stub,
    }
    for name, target in wanted.items():
        if not target.is_file():
            raise TritonStartError(f"expected {name} of the Python backend at {target}; it is missing")
    models = backend_sources()

    key = hashlib.sha256(f"{pytriton_dir}\n{SOURCE_DIR}".encode()).hexdigest()[:10]
    root = Path(cache_root) if cache_root is not None else _cache_root()
    dest = root / f"triton-backends-{_pytriton_version()}-py{py.replace('.', '')}-{key}"
    if _backend_dir_valid(dest, wanted, models):
        return dest

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-backends-", dir=root))
    try:
        (tmp / "python").mkdir()
        for name, target in wanted.items():
            shutil.copy2(target, tmp / "python" / name)
        install_backends(tmp)
        tmp.chmod(0o755)
        if dest.exists() or dest.is_symlink():
            LOG.info("rebuilding stale Triton backend directory %s", dest)
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.rename(tmp, dest)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not _backend_dir_valid(dest, wanted, models):
                raise
            # another process built it concurrently: use theirs
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    LOG.debug("Triton backend directory ready: %s", dest)
    return dest


def _backend_dir_valid(dest: Path, wanted: Mapping[str, Path], models: Mapping[str, Path]) -> bool:
    """The Python backend's files are same-size copies; each model.py links to (or equals) ours."""
    try:
        for name, target in wanted.items():
            entry = dest / "python" / name
            if entry.is_symlink() or not entry.is_file() or entry.stat().st_size != target.stat().st_size:
                return False
        for name, src in models.items():
            entry = dest / name / "model.py"
            if entry.is_symlink():
                if entry.resolve() != src.resolve():
                    return False
            elif not entry.is_file() or entry.read_bytes() != src.read_bytes():
                return False
    except OSError:
        return False
    return True


def _prepend_paths(paths: Iterable[Optional[os.PathLike | str]], existing: Optional[str]) -> str:
    out: List[str] = []
    for p in list(paths) + (existing.split(os.pathsep) if existing else []):
        if p is None:
            continue
        s = os.fspath(p)
        if s and s not in out:
            out.append(s)
    return os.pathsep.join(out)


def server_env(base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Environment for ``tritonserver``: a copy of ``base`` (default ``os.environ``) with

    * ``PATH`` starting with this interpreter's ``bin/`` (the stub's Python lookup), and
    * ``LD_LIBRARY_PATH`` starting with ``nvidia_pytriton.libs`` and the interpreter's LIBDIR.
    """
    env = dict(os.environ if base is None else base)
    env["PATH"] = _prepend_paths([_python_bin_dir()], env.get("PATH", os.defpath))
    env["LD_LIBRARY_PATH"] = _prepend_paths([_server_libs_dir(), _python_libdir()],
                                            env.get("LD_LIBRARY_PATH"))
    return env


def tool_env(base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Environment for Triton's client tools (``perf_analyzer``): a copy of ``base`` (default
    ``os.environ``) with this interpreter's ``bin/`` first on ``PATH`` and the CUDA runtime of
    ``nvidia-cuda-runtime-cu12`` (``libcudart.so.12``, which perf_analyzer links even on CPU)
    first on ``LD_LIBRARY_PATH``. ``libb64.so.0d`` comes from the system (Debian ``libb64-0d``).
    """
    env = dict(os.environ if base is None else base)
    env["PATH"] = _prepend_paths([_python_bin_dir()], env.get("PATH", os.defpath))
    cudart = _cuda_runtime_lib_dir()
    if cudart is None:
        LOG.warning("nvidia-cuda-runtime-cu12 not found: perf_analyzer needs libcudart.so.12")
    env["LD_LIBRARY_PATH"] = _prepend_paths([cudart], env.get("LD_LIBRARY_PATH"))
    return env


def perf_analyzer_path() -> Path:
    """Path of the ``perf_analyzer`` binary installed by the ``tritonclient==2.51.0`` wheel."""
    candidates = [_python_bin_dir() / "perf_analyzer"]
    scripts = sysconfig.get_path("scripts")
    if scripts:
        candidates.append(Path(scripts) / "perf_analyzer")
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    found = shutil.which("perf_analyzer")
    if found:
        return Path(found)
    raise FileNotFoundError(
        "perf_analyzer not found: expected it in "
        f"{', '.join(str(c) for c in candidates)} (it ships in the tritonclient==2.51.0 wheel)"
    )


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
# Process hygiene
# --------------------------------------------------------------------------------------------

_RUNNING: "set[TritonServer]" = set()
_RUNNING_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    with _RUNNING_LOCK:
        servers = list(_RUNNING)
    for server in servers:
        try:
            server.stop(timeout=10.0)
        except Exception:  # pragma: no cover - best effort at interpreter exit
            LOG.exception("could not stop tritonserver at exit")


atexit.register(_stop_all_at_exit)

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


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------

class TritonServer:
    """The embedded ``tritonserver`` as a child process (also a context manager).

    Args:
        model_repository: folder holding the models (``<name>/config.pbtxt``, ``<name>/1/...``).
        http_port, grpc_port, metrics_port: ports to bind on ``address``; ``None`` picks a free
            port at :meth:`start`. A requested port that is taken raises :class:`PortInUseError`
            before anything is spawned.
        model_control: ``"none"`` (load every model at start-up; ``--exit-on-error true``, so a
            model that fails to load makes start-up fail) or ``"explicit"`` (load only
            ``load_models`` at start-up, more through the repository API later).
        load_models: model names loaded at start-up with ``model_control="explicit"``; each must
            become READY or :meth:`start` raises :class:`TritonStartError`.
        log_verbose: Triton's ``--log-verbose`` level.
        log_file: where Triton's stdout/stderr go (default: a new temporary file); see
            :attr:`log_path`. The file is kept after :meth:`stop` for inspection.
        extra_args: further ``tritonserver`` arguments, appended last.
        startup_timeout: seconds to wait for ``GET /v2/health/ready`` to answer 200.
        address: interface to bind all endpoints to (default ``127.0.0.1``).
        stop_timeout: seconds :meth:`stop` waits after SIGINT before SIGKILL.
        exit_timeout: Triton's ``--exit-timeout-secs``: how long it lets in-flight requests
            (and open client connections) finish after SIGINT before exiting anyway.
        env: extra environment variables for the server (applied after :func:`server_env`).
    """

    def __init__(
        self,
        model_repository: os.PathLike | str,
        http_port: Optional[int] = None,
        grpc_port: Optional[int] = None,
        metrics_port: Optional[int] = None,
        model_control: str = "none",
        load_models: Optional[Sequence[str]] = None,
        log_verbose: int = 0,
        log_file: Optional[os.PathLike | str] = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 120.0,
        *,
        address: str = LOCALHOST,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT_S,
        exit_timeout: int = DEFAULT_EXIT_TIMEOUT_S,
        env: Optional[Mapping[str, str]] = None,
    ):
        repo = Path(model_repository)
        if not repo.is_dir():
            raise FileNotFoundError(f"model repository {repo} is not a directory: expected a "
                                    "folder with one sub-folder per model")
        if model_control not in MODEL_CONTROL_MODES:
            raise UserError(f"model_control must be one of {MODEL_CONTROL_MODES}, got {model_control!r}")
        if load_models and model_control != "explicit":
            raise UserError("load_models needs model_control='explicit' (with 'none' Triton loads "
                             f"every model of the repository); got model_control={model_control!r}")
        requested = {"HTTP": http_port, "gRPC": grpc_port, "metrics": metrics_port}
        for role, port in requested.items():
            if port is not None and not (isinstance(port, int) and 0 < port < 65536):
                raise UserError(f"{role} port must be an int in 1..65535 or None, got {port!r}")
        given = [p for p in requested.values() if p is not None]
        if len(given) != len(set(given)):
            raise UserError(f"HTTP, gRPC and metrics ports must differ, got {requested}")
        if startup_timeout <= 0:
            raise UserError(f"startup_timeout must be > 0 s, got {startup_timeout}")

        self.model_repository = repo.resolve()
        self.model_control = model_control
        self.load_models = list(load_models or [])
        self.log_verbose = int(log_verbose)
        self.extra_args = [str(a) for a in extra_args]
        self.startup_timeout = float(startup_timeout)
        self.stop_timeout = float(stop_timeout)
        if not 0 <= int(exit_timeout) < self.stop_timeout:
            raise UserError(f"exit_timeout must be in [0, stop_timeout={self.stop_timeout}) s, got {exit_timeout}")
        self.exit_timeout = int(exit_timeout)
        self.address = address
        self._requested_ports = requested
        self._ports: Dict[str, Optional[int]] = dict(requested)
        self._log_file_arg = Path(log_file) if log_file is not None else None
        self._extra_env = dict(env or {})
        self.log_path: Optional[Path] = self._log_file_arg
        self._process: Optional[subprocess.Popen] = None
        self._log_handle = None
        self._command: Optional[List[str]] = None
        self.returncode: Optional[int] = None
        #: seconds from spawn to ready, set by :meth:`start`
        self.startup_seconds: Optional[float] = None

    # -- addresses ------------------------------------------------------------------------
    @property
    def _client_host(self) -> str:
        return LOCALHOST if self.address in ("0.0.0.0", "", "::") else self.address

    def _port(self, role: str) -> int:
        port = self._ports[role]
        if port is None:
            raise RuntimeError(f"the {role} port is picked when the server starts: call start() first")
        return port

    @property
    def http_port(self) -> int:
        return self._port("HTTP")

    @property
    def grpc_port(self) -> int:
        return self._port("gRPC")

    @property
    def metrics_port(self) -> int:
        return self._port("metrics")

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP/REST endpoint (the form tritonclient.http and perf_analyzer take)."""
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint."""
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """``host:port`` of the Prometheus metrics endpoint (served under ``/metrics``)."""
        return f"{self._client_host}:{self.metrics_port}"

    @property
    def metrics_endpoint(self) -> str:
        """Full URL of the Prometheus metrics page, ``http://host:port/metrics``."""
        return f"http://{self.metrics_url}/metrics"

    @property
    def pid(self) -> Optional[int]:
        return self._process.pid if self._process is not None else None

    @property
    def command(self) -> List[str]:
        """The ``tritonserver`` command line (ports as resolved; free ports once started)."""
        return list(self._command) if self._command else self._build_command(self._ports)

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"TritonServer({str(self.model_repository)!r}, {state}, ports={self._ports})"

    def is_running(self) -> bool:
        """True while the tritonserver process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> "TritonServer":
        """Spawn tritonserver and wait until it is ready (and every ``load_models`` entry too).

        Returns ``self``. Raises :class:`PortInUseError` before spawning when a requested port
        is taken, :class:`TritonStartError` when the process exits or is not ready in time.
        """
        if self.is_running():
            raise RuntimeError(f"tritonserver is already running (pid {self.pid})")
        for role, port in self._requested_ports.items():
            if port is not None and not port_is_free(port, self.address or LOCALHOST):
                raise PortInUseError(port, role, self.address)

        auto = any(p is None for p in self._requested_ports.values())
        attempts = _PORT_RACE_ATTEMPTS if auto else 1
        for attempt in range(1, attempts + 1):
            self._ports = self._resolve_ports()
            try:
                self._spawn_and_wait()
                return self
            except TritonStartError as exc:
                if attempt < attempts and self._lost_port_race():
                    LOG.warning("a picked port was taken before tritonserver bound it; retrying "
                                "with new ports (attempt %d/%d)", attempt + 1, attempts)
                    continue
                raise exc
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop the server: SIGINT, wait up to ``timeout`` (default ``stop_timeout``) seconds,
        then SIGKILL the whole process group. Leftover group members (Python-backend stubs) are
        killed too. Idempotent."""
        proc = self._process
        if proc is None:
            return
        timeout = self.stop_timeout if timeout is None else timeout
        pgid = proc.pid  # leader of its own session/process group
        try:
            if proc.poll() is None:
                LOG.info("stopping tritonserver pid %d (SIGINT, up to %.0f s)", proc.pid, timeout)
                t0 = time.monotonic()
                try:
                    proc.send_signal(signal.SIGINT)
                    proc.wait(timeout=timeout)
                    LOG.info("tritonserver pid %d exited with code %s after %.1f s",
                             proc.pid, proc.returncode, time.monotonic() - t0)
                except subprocess.TimeoutExpired:
                    LOG.warning("tritonserver pid %d still running %.0f s after SIGINT: SIGKILL",
                                proc.pid, timeout)
                    self._kill_group(pgid)
                    proc.wait()
            # Anything left in the group (e.g. a stub whose server died) is an orphan now.
            if _group_alive(pgid):
                deadline = time.monotonic() + 2.0
                while _group_alive(pgid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if _group_alive(pgid):
                    LOG.warning("killing processes left in tritonserver's process group %d", pgid)
                    self._kill_group(pgid)
        finally:
            self.returncode = proc.returncode
            self._process = None
            if self._log_handle is not None:
                self._log_handle.close()
                self._log_handle = None
            with _RUNNING_LOCK:
                _RUNNING.discard(self)

    # -- health ---------------------------------------------------------------------------
    def _http_status(self, path: str, timeout: float = 2.0) -> Optional[int]:
        url = f"http://{self._client_host}:{self._ports['HTTP']}{path}"
        # No proxies: 127.0.0.1 must never go through an http_proxy from the environment.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(url, timeout=timeout) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except (urllib.error.URLError, ConnectionError, socket.timeout, OSError):
            return None

    def is_ready(self) -> bool:
        """``GET /v2/health/ready`` answers 200 (with strict readiness: every model is ready)."""
        return self.is_running() and self._http_status("/v2/health/ready") == 200

    def model_ready(self, name: str, version: str = "") -> bool:
        """``GET /v2/models/<name>[/versions/<v>]/ready`` answers 200."""
        path = f"/v2/models/{urllib.parse.quote(name)}"
        if version:
            path += f"/versions/{urllib.parse.quote(str(version))}"
        return self.is_running() and self._http_status(path + "/ready") == 200

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of Triton's log."""
        return _read_tail(self.log_path, lines) if self.log_path else ""

    # -- internals ------------------------------------------------------------------------
    def _resolve_ports(self) -> Dict[str, int]:
        host = self.address or LOCALHOST
        ports: Dict[str, int] = {}
        taken = {p for p in self._requested_ports.values() if p is not None}
        for role, port in self._requested_ports.items():
            if port is None:
                port = find_free_port(host if host not in ("0.0.0.0", "::") else "", exclude=taken)
                taken.add(port)
            ports[role] = port
        return ports

    def _build_command(self, ports: Mapping[str, Optional[int]]) -> List[str]:
        def port_arg(role: str) -> str:
            return str(ports[role]) if ports[role] is not None else "<free port>"

        cmd = [
            str(tritonserver_path()),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backend_directory()}",
            f"--model-control-mode={self.model_control}",
            f"--strict-readiness=true",
            f"--exit-on-error={'true' if self.model_control == 'none' else 'false'}",
            f"--exit-timeout-secs={self.exit_timeout}",
            "--allow-http=true",
            f"--http-address={self.address}",
            f"--http-port={port_arg('HTTP')}",
            "--allow-grpc=true",
            f"--grpc-address={self.address}",
            f"--grpc-port={port_arg('gRPC')}",
            "--allow-metrics=true",
            f"--metrics-address={self.address}",
            f"--metrics-port={port_arg('metrics')}",
            f"--log-verbose={self.log_verbose}",
        ]
        if not any("shm-region-prefix-name" in a for a in self.extra_args):
            # Python-backend shared-memory regions are named after this prefix: make it unique
            # per server so that several servers on one machine never share a region.
            cmd.append(f"--backend-config=python,shm-region-prefix-name=comrecycle_{os.getpid()}_{id(self):x}_")
        cmd += [f"--load-model={name}" for name in self.load_models]
        cmd += self.extra_args
        return cmd

    def _open_log(self):
        if self._log_file_arg is not None:
            self._log_file_arg.parent.mkdir(parents=True, exist_ok=True)
            self.log_path = self._log_file_arg
            return open(self.log_path, "wb")
        fd, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
        self.log_path = Path(name)
        return os.fdopen(fd, "wb")

    def _spawn_and_wait(self) -> None:
        cmd = self._build_command(self._ports)
        self._command = cmd
        env = server_env()
        env.update(self._extra_env)
        self._log_handle = self._open_log()
        LOG.info("starting tritonserver: HTTP %s, gRPC %s, metrics %s, repository %s, log %s",
                 self.http_url, self.grpc_url, self.metrics_url, self.model_repository, self.log_path)
        LOG.debug("command: %s", shlex.join(cmd))
        t0 = time.monotonic()
        try:
            proc = subprocess.Popen(
                cmd, env=env, stdin=subprocess.DEVNULL, stdout=self._log_handle,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_death_signal_preexec(),
                close_fds=True,
            )
        except OSError as exc:
            self._log_handle.close()
            self._log_handle = None
            raise TritonStartError(f"could not execute tritonserver: {exc}\ncommand: {shlex.join(cmd)}",
                                   log_path=self.log_path, command=cmd) from exc
        self._process = proc
        with _RUNNING_LOCK:
            _RUNNING.add(self)

        deadline = t0 + self.startup_timeout
        live_since = None
        while True:
            rc = proc.poll()
            if rc is not None:
                self.stop()
                raise self._start_error(f"tritonserver exited with code {rc} during start-up, "
                                        "before it was ready")
            if self._http_status("/v2/health/ready", timeout=1.0) == 200:
                break
            # Triton opens its HTTP endpoint only after the start-up loads are done: live but
            # not ready then means a model failed to load (--exit-on-error=false keeps it up),
            # which no amount of waiting fixes
            if self._http_status("/v2/health/live", timeout=1.0) == 200:
                live_since = live_since or time.monotonic()
                if time.monotonic() - live_since > NOT_READY_GRACE_S:
                    self.stop()
                    raise self._start_error(f"tritonserver is live but not ready {NOT_READY_GRACE_S:.0f} s "
                                            "after its start-up loads: a model failed to load")
            else:
                live_since = None
            if time.monotonic() > deadline:
                self.stop()
                raise self._start_error(f"tritonserver was not ready (GET /v2/health/ready != 200) "
                                        f"within startup_timeout={self.startup_timeout:.0f} s")
            time.sleep(0.1)

        not_ready = [m for m in self.load_models if not self.model_ready(m)]
        if not_ready:
            self.stop()
            raise self._start_error(f"expected models {not_ready} to be READY after start-up "
                                    "(model_control='explicit', load_models); they are not")
        self.startup_seconds = time.monotonic() - t0
        LOG.info("tritonserver pid %d ready in %.2f s (HTTP %s, gRPC %s, metrics %s)",
                 proc.pid, self.startup_seconds, self.http_url, self.grpc_url, self.metrics_url)

    def _start_error(self, reason: str) -> TritonStartError:
        lines = [reason + ".", f"command: {shlex.join(self._command or [])}", f"log: {self.log_path}"]
        errors = _error_lines(self.log_path) if self.log_path else []
        if errors:
            lines.append("errors reported by Triton:")
            lines += [f"  {e}" for e in errors]
        lines.append(f"--- last {LOG_TAIL_LINES} lines of the Triton log ---")
        lines.append(self.log_tail())
        return TritonStartError("\n".join(lines), log_path=self.log_path, command=self._command)

    def _lost_port_race(self) -> bool:
        tail = self.log_tail(200).lower()
        return "already in use" in tail or "address in use" in tail or "failed to bind" in tail

    @staticmethod
    def _kill_group(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


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
