"""The command line: --help everywhere, clear errors, simulate writes the request-log schema."""
import subprocess
import sys
from pathlib import Path

import pytest

from comrecycle.sim.logs import read_log

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ["simulate", "train-estimator", "build-models", "profile-costs", "serve", "replay", "perf", "demo",
            "install-estimator", "install-params"]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "comrecycle.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_console_script_is_installed():
    assert (Path(sys.executable).parent / "comrecycle").exists()


@pytest.mark.parametrize("cmd", [[]] + [[c] for c in COMMANDS])
def test_help(cmd):
    r = cli(*cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout


@pytest.mark.parametrize("module", ["build_models.py", "-m perf.cascade_perf", "-m client.replay",
                                    "-m perf.perf_analyzer_run", "-m comrecycle.serving.server"])
def test_help_of_scripts(module):
    r = subprocess.run([sys.executable, *module.split(), "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0 and "usage" in r.stdout, r.stderr


def test_simulate_writes_the_log(tmp_path):
    out = tmp_path / "logs.parquet"
    r = cli("simulate", "--out", str(out), "--requests", "400", "--policy", "legacy", "--profile", "tiny",
            "--seed", "3", "--quiet")
    assert r.returncode == 0, r.stderr
    t = read_log(out, require_sim_columns=True)
    assert t.num_rows == 400
    assert (t["strategy"].to_numpy() == 0).all() and (t["propensity"].to_numpy() == 1).all()


def test_simulate_with_the_cascade(tmp_path, tiny_model_set):
    out = tmp_path / "logs.parquet"
    r = cli("simulate", "--out", str(out), "--requests", "100", "--models", str(tiny_model_set), "--quiet")
    assert r.returncode == 0, r.stderr
    assert read_log(out).num_rows == 100


def test_simulate_random_in_two_processes(tmp_path, tiny_model_set):
    out = tmp_path / "logs.parquet"
    r = cli("simulate", "--out", str(out), "--requests", "201", "--models", str(tiny_model_set),
            "--logging", "random", "--workers", "2", "--concurrency", "32", "--quiet")
    assert r.returncode == 0, r.stderr
    t = read_log(out)
    assert t.num_rows == 201
    assert len(set(t["request_id"].to_pylist())) == 201
    assert {f"q_{j}" for j in range(4)} <= set(t.column_names)
    ts = t["ts"].to_numpy()
    assert (ts[1:] >= ts[:-1]).all()


@pytest.mark.parametrize("args,message", [
    (["simulate", "--out", "x.parquet", "--logging", "random", "--policy", "legacy"], "use --policy cascade"),
    (["simulate", "--out", "x.parquet", "--models", "/nonexistent"], "no model set in /nonexistent"),
    (["simulate", "--out", "x.parquet", "--requests", "0", "--policy", "legacy"], "--requests must be >= 1"),
    (["profile-costs", "--models", "/nonexistent"], "no model set"),
    (["simulate", "--out", "x.parquet", "--profile", "huge", "--policy", "legacy"], "unknown profile 'huge'"),
])
def test_clear_errors(args, message):
    r = cli(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_options_of_wrapped_tools_must_follow_the_separator():
    r = subprocess.run([sys.executable, "-m", "comrecycle.cli", "perf", "--concurrency", "1"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2
    assert "the options of `comrecycle perf` go after `--`: comrecycle perf -- --concurrency 1" in r.stderr


def test_demo_refuses_a_confidence_level_before_any_work():
    r = subprocess.run([sys.executable, "-m", "comrecycle.cli", "demo", "--confidence", "2"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and "--confidence: expected a level in [0.5, 1)" in r.stderr


@pytest.mark.parametrize("weights, says", [
    ("0.5,0.5,0.5", "expected 4 positive finite numbers"),
    ("1,1,1,1;1,1,1,1", "expected 4 comma-separated positive numbers"),
    ("0.45,0,0,0.45", "expected 4 positive finite numbers"),
    ("1000,1,1,1000", "every strategy needs a share of at least 0.01"),
])
def test_demo_refuses_certification_arm_weights_before_any_work(weights, says):
    r = subprocess.run([sys.executable, "-m", "comrecycle.cli", "demo", "--certify-arm-weights", weights],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2 and f"--certify-arm-weights: {says}" in r.stderr, r.stderr
    assert weights in r.stderr  # what arrived


def test_certification_log_names_its_logging_weights():
    from comrecycle.policy.deploy import certify_arm_shares, certify_log_tag

    assert certify_log_tag(None) == certify_log_tag((1, 1, 1, 1)) == ""  # uniform: the earlier file names
    assert certify_log_tag((0.45, 0.05, 0.05, 0.45)) == certify_log_tag((9, 1, 1, 9)) == "_w0.45-0.05-0.05-0.45"
    # the simulator draws with the same rounded shares that name the log
    assert certify_arm_shares((0.4504, 0.05, 0.05, 0.45)) == (0.45, 0.05, 0.05, 0.45)
    assert certify_arm_shares((1, 1, 1, 1.0001)) is None and certify_log_tag((1, 1, 1, 1.0001)) == ""  # uniform


def _dead_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_replay_against_a_dead_port_is_one_line(protocol):
    port = _dead_port()
    r = cli("replay", "--url", f"127.0.0.1:{port}", "--protocol", protocol, "--requests", "50",
            "--repository", "/nonexistent", timeout=120)
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"comrecycle replay: error: cannot reach tritonserver at 127.0.0.1:{port} over "
                               f"{protocol}: ")
    assert "refused" in lines[0].lower() or "connect" in lines[0].lower()


def test_replay_help_names_the_router():
    r = cli("replay", "--help")
    assert "--model" in r.stdout and "recycle_router" in r.stdout


def test_install_commands_refuse_what_cannot_be_installed(tmp_path, tiny_repository, tiny_estimator):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo)
    # not an estimator directory
    r = cli("install-estimator", "--repository", str(repo), "--estimator", str(tmp_path))
    assert r.returncode == 2 and "expected a trained estimator directory" in r.stderr
    assert "missing ['estimator.onnx', 'manifest.json']" in r.stderr
    # a Parquet file given as params
    bad = tmp_path / "params.parquet"
    bad.write_bytes(b"PAR1\x80\x00binary")
    r = cli("install-params", "--repository", str(repo), "--params", str(bad))
    assert r.returncode == 2 and "not a params JSON file (expected the output of `comrecycle solve`)" in r.stderr
    # params without costs
    half = tmp_path / "half.json"
    half.write_text('{"lambda": 1.0}')
    r = cli("install-params", "--repository", str(repo), "--params", str(half))
    assert r.returncode == 2 and "missing keys ['costs']" in r.stderr
    good = tmp_path / "p.json"
    good.write_text('{"lambda": 0.5, "costs": [1.0, 0.9, 0.8, 0.05]}')
    r = cli("install-params", "--repository", str(repo), "--params", str(good), "--estimator-version", "9")
    assert r.returncode == 2 and "estimator version 9 is not installed" in r.stderr
    # what works: a second estimator version, then params calling it
    r = cli("install-estimator", "--repository", str(repo), "--estimator", str(tiny_estimator))
    assert r.returncode == 0, r.stderr
    assert "estimator version 2" in r.stdout
    r = cli("install-params", "--repository", str(repo), "--params", str(good))
    assert r.returncode == 0, r.stderr
    assert "calling estimator version 2" in r.stdout
    assert '"estimator_model_version": 2' in (repo / "recycle_router" / "1" / "params.json").read_text()


@pytest.mark.parametrize("raised, code", [("user", 2), ("failure", 1), ("bug", None)])
def test_exit_codes_tell_bad_input_from_failures_and_bugs(raised, code, monkeypatch, capsys):
    """UserError -> one line, exit 2; ServingFailure -> one line, exit 1; anything else is a bug
    and keeps its traceback (a numpy ValueError is not "bad input")."""
    import comrecycle.repository
    from comrecycle.cli import main
    from comrecycle.errors import ServingFailure, UserError

    def install(*args, **kwargs):
        raise {"user": UserError("expected X, got Y"), "failure": ServingFailure("redis-server exited"),
               "bug": ValueError("operands could not be broadcast together")}[raised]

    monkeypatch.setattr(comrecycle.repository, "install_router_params", install)
    argv = ["install-params", "--params", "p.json"]
    if code is None:
        with pytest.raises(ValueError, match="broadcast"):
            main(argv)
        return
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ("expected X, got Y" in err or "redis-server exited" in err)
