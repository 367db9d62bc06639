"""Two clones on one machine each import their own code after `scripts/setup.sh`.

The dependencies live in one cached environment shared by every clone; each clone's `.venv` is its
own small environment holding its editable install. Here two copies of this working tree run the
real set-up one after the other (the cached dependencies are reused, so each takes seconds), and
the first copy must still import its own `comrecycle` and run its own console script.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _copy_tree(dest: Path) -> None:
    """The files git would put in a clone (tracked + untracked, not ignored) of this working tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for rel in filter(None, listed):
        src = ROOT / rel.decode()
        if src.is_file():
            target = dest / rel.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def _setup(clone: Path) -> None:
    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env["PYTHON"] = getattr(sys, "_base_executable", None) or "python3"
    r = subprocess.run(["bash", "scripts/setup.sh"], cwd=clone, env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs git and a git working tree to copy")
def test_each_clone_imports_its_own_code(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    for clone in (first, second):
        _copy_tree(clone)
    # A marker only the first copy has: a change there is visible there and nowhere else.
    (first / "comrecycle" / "_clone_marker.py").write_text("WHO = 'first'\n")
    _setup(first)
    _setup(second)

    def where(clone: Path) -> str:
        r = subprocess.run([str(clone / ".venv" / "bin" / "python"), "-c",
                            "import comrecycle, importlib.util as u; print(comrecycle.__file__); "
                            "print(u.find_spec('comrecycle._clone_marker') is not None)"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout

    out_first, out_second = where(first), where(second)
    assert out_first.splitlines() == [str(first / "comrecycle" / "__init__.py"), "True"]
    assert out_second.splitlines() == [str(second / "comrecycle" / "__init__.py"), "False"]
    assert not (first / ".venv").is_symlink() and not (second / ".venv").is_symlink()
    # The console script of the first clone runs the first clone's code.
    script = first / ".venv" / "bin" / "comrecycle"
    assert script.read_text().splitlines()[0] == f"#!{first / '.venv' / 'bin' / 'python'}"
    r = subprocess.run([str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "simulate" in r.stdout, r.stderr
    # perf_analyzer is reachable from each clone's environment.
    assert (first / ".venv" / "bin" / "perf_analyzer").exists()
