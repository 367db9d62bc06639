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
