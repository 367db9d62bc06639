"""Serving by hand with the CLI, as the README shows it: `comrecycle serve --with-redis` on a
repository whose router has no params yet (it says so), `comrecycle install-params` and a load
through Triton's repository API, then `comrecycle replay --model recycle_router`; SIGTERM stops
tritonserver and the redis-server it started. Real tritonserver, real redis-server."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from comrecycle.serving.server import find_free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "comrecycle.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def _wait_for(path: Path, pattern: str, proc: subprocess.Popen, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if re.search(pattern, text):
            return text
        if proc.poll() is not None:
            pytest.fail(f"`comrecycle serve` exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"no {pattern!r} in the serve log after {timeout} s:\n{text[-3000:]}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_serve_with_redis_install_params_and_replay_through_the_router(tiny_repository, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo)  # stages + estimator, no router params
    http, grpc, metrics = (find_free_port() for _ in range(3))
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "comrecycle.cli", "serve", "--repository", str(repo),
                                 "--with-redis", "--http-port", str(http), "--grpc-port", str(grpc),
                                 "--metrics-port", str(metrics)], stdout=log_file, stderr=subprocess.STDOUT,
                                cwd=ROOT)
    try:
        text = _wait_for(log_path, r"serving .*Ctrl-C or SIGTERM to stop", proc)
        assert re.search(r"not loading recycle_router: no version holds params\.json: .*comrecycle install-params",
                         text), text
        redis_pid = int(re.search(r"redis-server (\d+) on redis://127\.0\.0\.1:\d+/0", text).group(1))
        assert _pid_alive(redis_pid)

        # the router is not loaded yet: one line that says so, exit 2
        r = cli("replay", "--url", f"127.0.0.1:{grpc}", "--repository", repo, "--model", "recycle_router",
                "--requests", 20)
        assert r.returncode == 2
        assert "answers, but model 'recycle_router' is not loaded or not ready" in r.stderr, r.stderr

        params = tmp_path / "p.json"  # λ small, strategy 3 cheap: repeats with a cache are recycled
        params.write_text(json.dumps({"lambda": 1e-3, "costs": [1.0, 0.9, 0.8, 0.05], "omega": 0.0,
                                      "estimator_cost": 0.02, "budget": 0.01}))
        r = cli("install-params", "--repository", repo, "--params", params)
        assert r.returncode == 0, r.stderr
        load = urllib.request.Request(f"http://127.0.0.1:{http}/v2/repository/models/recycle_router/load",
                                      method="POST", data=b"")
        with urllib.request.urlopen(load, timeout=120) as resp:
            assert resp.status == 200

        out = tmp_path / "replay.json"
        r = cli("replay", "--url", f"127.0.0.1:{grpc}", "--repository", repo, "--model", "recycle_router",
                "--requests", 300, "--concurrency", 8, "--json", out)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "strategy mix 0/1/2/3 (% of all 300 answered requests)" in r.stdout
        assert re.search(r"strategy mix 0/1/2/3 \(% of the \d+ repeated requests\)", r.stdout)
        rep = json.loads(out.read_text())
        assert rep["requests"] == 300 and rep["errors"] == 0
        assert rep["repeated_requests"] > 100
        # the router recycled through Redis: strategy 3 on repeats, never on first pages
        assert rep["mix_repeated_requests"]["3"] > 0.2
        assert rep["mix_all_requests"]["3"] < rep["mix_repeated_requests"]["3"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    deadline = time.monotonic() + 10
    while _pid_alive(redis_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _pid_alive(redis_pid), "the redis-server started by --with-redis outlived the server"
