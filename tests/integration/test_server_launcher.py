"""Integration tests of the embedded-Triton launcher and the perf_analyzer runner.

Everything here runs the REAL ``tritonserver`` from nvidia-pytriton and the real ``perf_analyzer``
from tritonclient 2.51.0 (no mocks). One server (floor model + a variable-length model) is shared
by the module; the lifecycle tests start their own. About 25 s on 2 CPU cores.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from comrecycle.serving.floor import FLOOR_INPUT, FLOOR_MODEL, FLOOR_OUTPUT, write_floor_repository
from comrecycle.serving.server import (
    PortInUseError,
    TritonServer,
    TritonStartError,
    find_free_port,
    port_is_free,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
try:
    from perf.perf_analyzer_run import PerfAnalyzerError, run_perf, write_input_data, write_rows_csv
except ModuleNotFoundError:  # `perf` is mapped by the editable install only after setup.sh re-ran
    sys.path.insert(0, str(REPO_ROOT))
    from perf.perf_analyzer_run import PerfAnalyzerError, run_perf, write_input_data, write_rows_csv

pytestmark = pytest.mark.integration

VARLEN_MODEL = "history_length"

VARLEN_MODEL_PY = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            history = pb_utils.get_input_tensor_by_name(request, "history").as_numpy()
            length = np.array([history.shape[0]], dtype=np.int64)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("length", length)]))
        return responses
'''

BROKEN_MODEL_PY = '''
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("deliberately broken model: boom-4711")

    def execute(self, requests):
        return []
'''


def _write_python_model(repo: Path, name: str, source: str, inputs, outputs, max_batch_size=0) -> None:
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=max_batch_size)
    for tensor_name, dims in inputs:
        config.input.append(mc.ModelInput(name=tensor_name, data_type=mc.TYPE_INT64, dims=dims))
    for tensor_name, dims in outputs:
        config.output.append(mc.ModelOutput(name=tensor_name, data_type=mc.TYPE_INT64, dims=dims))
    config.instance_group.append(mc.ModelInstanceGroup(count=1, kind=mc.ModelInstanceGroup.KIND_CPU))
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    (repo / name / "config.pbtxt").write_text(text_format.MessageToString(config))
    (repo / name / "1" / "model.py").write_text(source)


def _processes_in_group(pgid: int) -> list[tuple[int, str, str]]:
    """(pid, command name, state) of every process whose process group is ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid:
            found.append((int(entry), comm, fields[0]))
    return found


@pytest.fixture(scope="module")
def floor_repo(tmp_path_factory) -> Path:
    repo = write_floor_repository(tmp_path_factory.mktemp("floor_repo"))
    _write_python_model(repo, VARLEN_MODEL, VARLEN_MODEL_PY,
                        inputs=[("history", [-1])], outputs=[("length", [1])])
    return repo


@pytest.fixture(scope="module")
def server(floor_repo):
    with TritonServer(floor_repo, startup_timeout=60) as srv:
        yield srv


@pytest.fixture()
def http_client(server):
    client = httpclient.InferenceServerClient(server.http_url)
    yield client
    client.close()  # Triton waits for open HTTP connections on shutdown


@pytest.fixture()
def grpc_client(server):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


# ------------------------------------------------------------------------------------------------
# A running server
# ------------------------------------------------------------------------------------------------

def test_server_ready_and_models_ready(server, http_client, grpc_client):
    assert server.is_running() and server.is_ready()
    assert server.http_url == f"127.0.0.1:{server.http_port}"
    assert server.grpc_url == f"127.0.0.1:{server.grpc_port}"
    assert len({server.http_port, server.grpc_port, server.metrics_port}) == 3
    assert server.startup_seconds is not None and server.startup_seconds < 60
    assert http_client.is_server_ready() and grpc_client.is_server_ready()
    for model in (FLOOR_MODEL, VARLEN_MODEL):
        assert server.model_ready(model)
        assert http_client.is_model_ready(model)
        assert grpc_client.is_model_ready(model)
    assert not server.model_ready("no_such_model")
    assert server.log_path is not None and server.log_path.is_file()
    assert "Started GRPCInferenceService" in server.log_path.read_text()


def test_metrics_endpoint(server):
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(server.metrics_endpoint, timeout=5) as resp:
        assert resp.status == 200
        assert b"nv_inference_request_success" in resp.read()


def test_infer_over_http_and_grpc(http_client, grpc_client):
    ids = np.array([[5], [7], [1 << 40]], dtype=np.int64)  # a batch of 3 requests' worth
    inp = httpclient.InferInput(FLOOR_INPUT, list(ids.shape), "INT64")
    inp.set_data_from_numpy(ids)
    result = http_client.infer(FLOOR_MODEL, [inp], outputs=[httpclient.InferRequestedOutput(FLOOR_OUTPUT)])
    np.testing.assert_array_equal(result.as_numpy(FLOOR_OUTPUT), ids)

    inp = grpcclient.InferInput(FLOOR_INPUT, list(ids.shape), "INT64")
    inp.set_data_from_numpy(ids)
    result = grpc_client.infer(FLOOR_MODEL, [inp])
    np.testing.assert_array_equal(result.as_numpy(FLOOR_OUTPUT), ids)

    history = np.arange(9, dtype=np.int64)
    inp = grpcclient.InferInput("history", [9], "INT64")
    inp.set_data_from_numpy(history)
    assert grpc_client.infer(VARLEN_MODEL, [inp]).as_numpy("length").tolist() == [9]


# ------------------------------------------------------------------------------------------------
# Start-up failures
# ------------------------------------------------------------------------------------------------

def test_port_in_use_is_reported_before_spawning(floor_repo):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert not port_is_free(port)
        srv = TritonServer(floor_repo, grpc_port=port)
        t0 = time.monotonic()
        with pytest.raises(PortInUseError) as info:
            srv.start()
        assert time.monotonic() - t0 < 2.0
    assert info.value.port == port and info.value.role == "gRPC"
    assert str(port) in str(info.value)
    assert isinstance(info.value, TritonStartError)
    assert srv.pid is None and srv.log_path is None  # nothing was spawned, no log opened
    assert port_is_free(port)


def test_broken_model_reports_tritons_own_error(tmp_path):
    repo = write_floor_repository(tmp_path / "repo")
    _write_python_model(repo, "broken", BROKEN_MODEL_PY, inputs=[("x", [1])], outputs=[("y", [1])])
    srv = TritonServer(repo, startup_timeout=60)
    with pytest.raises(TritonStartError) as info:
        srv.start()
    message = str(info.value)
    assert "failed to load 'broken'" in message
    assert "deliberately broken model: boom-4711" in message
    assert "tritonserver" in message and "--model-repository" in message  # the command line
    assert info.value.log_path == srv.log_path and srv.log_path.is_file()
    assert not srv.is_running() and srv.pid is None


def test_startup_timeout_stops_the_process(floor_repo):
    srv = TritonServer(floor_repo, startup_timeout=0.05)
    with pytest.raises(TritonStartError, match="not ready .* within startup_timeout"):
        srv.start()
    assert srv.pid is None and not srv.is_running()


def test_bad_arguments_are_rejected(floor_repo, tmp_path):
    with pytest.raises(ValueError, match="model_control must be one of"):
        TritonServer(floor_repo, model_control="poll")
    with pytest.raises(ValueError, match="needs model_control='explicit'"):
        TritonServer(floor_repo, load_models=[FLOOR_MODEL])
    with pytest.raises(FileNotFoundError, match="not a directory"):
        TritonServer(tmp_path / "missing")
    with pytest.raises(ValueError, match="must differ"):
        TritonServer(floor_repo, http_port=9000, grpc_port=9000)


# ------------------------------------------------------------------------------------------------
# Stopping
# ------------------------------------------------------------------------------------------------

def test_stop_leaves_no_process(floor_repo, tmp_path):
    log = tmp_path / "triton.log"
    with TritonServer(floor_repo, model_control="explicit", load_models=[FLOOR_MODEL],
                      log_file=log) as srv:
        pgid = srv.pid
        members = _processes_in_group(pgid)
        names = {name for _, name, _ in members}
        assert "tritonserver" in names
        assert any(name.startswith("triton_python") for name in names), members  # the model's stub
        assert srv.model_ready(FLOOR_MODEL) and not srv.model_ready(VARLEN_MODEL)  # explicit mode
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 15
    assert _processes_in_group(pgid) == []
    for pid, _, _ in members:
        assert not Path(f"/proc/{pid}").exists()
    assert srv.log_path == log and "Started HTTPService" in log.read_text()
    srv.stop()  # idempotent


def test_cli_runs_in_foreground_until_sigterm(floor_repo):
    http_port = find_free_port()
    grpc_port = find_free_port(exclude=[http_port])
    metrics_port = find_free_port(exclude=[http_port, grpc_port])
    cmd = [sys.executable, "-m", "comrecycle.serving.server", "--model-repository", str(floor_repo),
           "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO_ROOT, start_new_session=True)
    seen = []
    try:
        # wait for the CLI's own "serving" line (it logs it once its readiness check passed)
        for line in proc.stdout:
            seen.append(line)
            if "serving " in line and "| gRPC" in line:
                break
        assert proc.poll() is None, "".join(seen)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
        assert client.is_server_ready() and client.is_model_ready(FLOOR_MODEL)
        client.close()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        out = "".join(seen) + rest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    assert "SIGTERM: shutting down" in out and "stopped" in out
    assert _processes_in_group(proc.pid) == []
    assert port_is_free(http_port) and port_is_free(grpc_port)


# ------------------------------------------------------------------------------------------------
# perf_analyzer
# ------------------------------------------------------------------------------------------------

def test_perf_analyzer_smoke_both_protocols(server, tmp_path):
    user_ids = [3, 17, 256, 1 << 33, 99]
    data = write_input_data(tmp_path / "ids.json", [{FLOOR_INPUT: np.array([u])} for u in user_ids],
                            validation=[{FLOOR_OUTPUT: np.array([u])} for u in user_ids])
    rows = []
    for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
        rows += run_perf(FLOOR_MODEL, url, protocol, [1, 2], input_data=data,
                         measurement_interval_ms=250, stability_percentage=100, max_trials=10,
                         timeout_s=60, label="floor")
    assert [(r["protocol"], r["concurrency"]) for r in rows] == [("grpc", 1), ("grpc", 2), ("http", 1), ("http", 2)]
    for row in rows:
        assert row["model"] == FLOOR_MODEL and row["batch_size"] == 1 and row["label"] == "floor"
        assert row["throughput_infer_per_s"] > 0
        assert 0 < row["p50_us"] <= row["p90_us"] <= row["p95_us"] <= row["p99_us"]
        assert row["avg_us"] > 0 and row["server_compute_infer_us"] > 0
    out = write_rows_csv(rows, tmp_path / "all.csv")
    lines = out.read_text().splitlines()
    assert len(lines) == 5 and lines[0].startswith("label,model,protocol,concurrency,batch_size,throughput_infer_per_s")


def test_perf_analyzer_variable_length_input_data(server, tmp_path):
    lengths = [1, 4, 11, 50]
    requests = [{"history": np.arange(n, dtype=np.int64) + 100} for n in lengths]
    data = write_input_data(tmp_path / "hist.json", requests,
                            validation=[{"length": np.array([n])} for n in lengths])
    # perf_analyzer validates every response against validation_data: a wrong shape fails the run
    rows = run_perf(VARLEN_MODEL, server.grpc_url, "grpc", [1], input_data=data,
                    request_count=200, timeout_s=60)
    assert len(rows) == 1 and rows[0]["throughput_infer_per_s"] > 0

    bad = write_input_data(tmp_path / "wrong.json", requests,
                           validation=[{"length": np.array([n + 1])} for n in lengths])
    with pytest.raises(PerfAnalyzerError, match="exited with code"):
        run_perf(VARLEN_MODEL, server.grpc_url, "grpc", [1], input_data=bad, request_count=50, timeout_s=60)


def test_perf_analyzer_error_names_the_problem(server):
    with pytest.raises(PerfAnalyzerError) as info:
        run_perf("no_such_model", server.http_url, "http", [1], measurement_interval_ms=200, timeout_s=30)
    message = str(info.value)
    assert "no_such_model" in message and "stderr tail" in message and "perf_analyzer" in message


def test_write_input_data_format(tmp_path):
    import json

    path = write_input_data(tmp_path / "d.json", [{"user_id": np.array([1]), "history": np.array([5, 6, 7])},
                                                  {"user_id": np.array([2]), "history": np.array([], dtype=np.int64)}])
    doc = json.loads(path.read_text())
    assert doc == {"data": [
        {"user_id": {"content": [1], "shape": [1]}, "history": {"content": [5, 6, 7], "shape": [3]}},
        {"user_id": {"content": [2], "shape": [1]}, "history": {"content": [], "shape": [0]}},
    ]}
    with pytest.raises(ValueError, match="expected the tensors"):
        write_input_data(tmp_path / "x.json", [{"user_id": np.array([1])}, {"uid": np.array([1])}])
    with pytest.raises(ValueError, match="got a scalar"):
        write_input_data(tmp_path / "x.json", [{"user_id": np.int64(1)}])


def test_cli_help():
    for module in ("comrecycle.serving.server", "perf.perf_analyzer_run"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                              cwd=REPO_ROOT, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "usage:" in proc.stdout


def test_a_failed_startup_load_is_reported_at_once_not_after_the_timeout(tmp_path):
    # explicit mode: tritonserver stays up (live, not ready) when a --load-model fails
    repo = write_floor_repository(tmp_path / "repo")
    _write_python_model(repo, "broken", BROKEN_MODEL_PY, inputs=[("x", [1])], outputs=[("y", [1])])
    srv = TritonServer(repo, model_control="explicit", load_models=[FLOOR_MODEL, "broken"], startup_timeout=300)
    t0 = time.monotonic()
    with pytest.raises(TritonStartError, match="live but not ready") as info:
        srv.start()
    assert time.monotonic() - t0 < 60
    assert "deliberately broken model: boom-4711" in str(info.value)
    assert not srv.is_running() and srv.pid is None
