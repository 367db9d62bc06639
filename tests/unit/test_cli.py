"""The command line: --help everywhere, clear errors, simulate writes the §7 schema."""
import subprocess
import sys
from pathlib import Path

import pytest

from comrecycle.sim.logs import read_log

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ["simulate", "train-estimator", "build-models", "profile-costs", "serve", "replay", "perf", "demo"]


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
