"""scripts/gpu_check.sh refuses clearly where it cannot run (no GPU, no GPU repository)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"
BASH = shutil.which("bash") or "/bin/bash"


def _run(tmp_path, env_extra, path_dirs):
    env = {"PATH": os.pathsep.join(str(p) for p in path_dirs), "HOME": str(tmp_path), **env_extra}
    return subprocess.run([BASH, str(SCRIPT), str(tmp_path / "out")], env=env, capture_output=True,
                          text=True, timeout=60)


def _bin_dir_without_nvidia_smi(tmp_path) -> Path:
    """A PATH folder with the few tools the script needs before its GPU check, and no nvidia-smi."""
    d = tmp_path / "bin"
    d.mkdir()
    for tool in ("dirname", "mkdir", "rm", "env"):
        found = shutil.which(tool)
        if found:
            (d / tool).symlink_to(found)
    return d


def test_the_script_parses():
    subprocess.run([BASH, "-n", str(SCRIPT)], check=True)


def test_without_a_gpu_it_refuses_with_exit_2(tmp_path):
    res = _run(tmp_path, {}, [_bin_dir_without_nvidia_smi(tmp_path)])
    assert res.returncode == 2
    assert "expected an NVIDIA GPU" in res.stderr


def test_without_the_gpu_repository_it_refuses_with_exit_2(tmp_path):
    d = _bin_dir_without_nvidia_smi(tmp_path)
    fake = d / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: a test double'\n")
    fake.chmod(0o755)
    res = _run(tmp_path, {"REPOSITORY": str(tmp_path / "no_such_repository")}, [d])
    assert res.returncode == 2
    assert "expected a model repository" in res.stderr and "no_such_repository" in res.stderr
