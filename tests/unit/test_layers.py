"""The serving process imports nothing of the offline tools: what the Python-backend models
import (their model.py files, read here) must not load pyarrow, torch, scikit-learn, scipy or the
offline packages (policy, sim, estimator training, models)."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = ("pyarrow", "torch", "sklearn", "scipy", "pandas", "comrecycle.policy", "comrecycle.sim",
           "comrecycle.estimator", "comrecycle.models", "comrecycle.build")


def _served_imports() -> list[str]:
    mods = set()
    for path in (ROOT / "comrecycle" / "serving" / "backends").glob("*/model.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("comrecycle"):
                mods.add(node.module)
    return sorted(mods)


def test_the_served_models_import_nothing_offline():
    mods = _served_imports()
    assert "comrecycle.router.serving" in mods and "comrecycle.serving.stage_model" in mods
    code = ("import sys\n" + "".join(f"import {m}\n" for m in mods) +
            f"print(sorted(m for m in {OFFLINE!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", f"the serving process loads offline code: {r.stdout.strip()}"


def test_import_contracts_hold():
    """The layers of pyproject.toml's [tool.importlinter] (apps > offline > Triton glue and
    launchers > router core and runtime > settings and specs), and no offline library in the
    serving process's modules. A new import against the flow fails here, naming the chain."""
    code = "import sys\nfrom importlinter.cli import lint_imports\nsys.exit(lint_imports(no_cache=True))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout


def test_an_import_against_the_flow_breaks_the_contract(tmp_path):
    """The same machinery on a two-module package whose lower layer imports the upper one."""
    pkg = tmp_path / "layered"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "high.py").write_text("X = 1\n")
    (pkg / "low.py").write_text("from layered.high import X\n")
    (tmp_path / "pyproject.toml").write_text(
        '[tool.importlinter]\nroot_packages = ["layered"]\n\n[[tool.importlinter.contracts]]\n'
        'name = "high over low"\ntype = "layers"\nlayers = ["layered.high", "layered.low"]\n')
    code = "import sys\nfrom importlinter.cli import lint_imports\nsys.exit(lint_imports(no_cache=True))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 1 and "layered.low -> layered.high" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
