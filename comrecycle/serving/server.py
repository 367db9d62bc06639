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

import atexit
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from ..errors import UserError
from .processes import (_death_signal_preexec, _error_lines, _group_alive, _read_tail, find_free_port,
                        port_is_free)
from .triton_env import (DEFAULT_EXIT_TIMEOUT_S, DEFAULT_STOP_TIMEOUT_S, LOCALHOST, LOG_TAIL_LINES,
                         MODEL_CONTROL_MODES, NOT_READY_GRACE_S, PortInUseError, TritonStartError, _PORT_RACE_ATTEMPTS,
                         backend_directory, perf_analyzer_path, server_env, tool_env, tritonserver_path)

LOG = logging.getLogger(__name__)

__all__ = [
    "PortInUseError",
    "TritonServer",
    "TritonStartError",
    "backend_directory",
    "find_free_port",
    "main",
    "perf_analyzer_path",
    "port_is_free",
    "server_env",
    "tool_env",
    "tritonserver_path",
]


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m comrecycle.serving.server``: see comrecycle.serving.server_cli."""
    from .server_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
