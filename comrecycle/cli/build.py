"""build_models.py: build a model set and generate the model repository.

  python build_models.py                       # default profile -> artifacts/models/default,
                                               #   installed into artifacts/model_repository/cpu
  python build_models.py --profile tiny --out DIR --repository REPO
  python build_models.py --configs-only        # regenerate the committed configs of all three
                                               #   variants (cpu, gpu, container) from specs.py
  python build_models.py --variant gpu         # install into artifacts/model_repository/gpu
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..build import ensure_model_set, regenerate_committed_configs
from ..profiles import PROFILES
from ..repository import DEFAULT_REPOSITORY, VARIANTS, REPO_ROOT

log = logging.getLogger("comrecycle.build")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="build_models.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="model set directory (default artifacts/models/PROFILE)")
    ap.add_argument("--variant", choices=VARIANTS, default="cpu",
                    help="cpu: embedded server, Python-backend stages on CPU; gpu: the same on KIND_GPU "
                         "with the CUDA execution provider; container: native onnxruntime backend")
    ap.add_argument("--device", choices=("cpu", "gpu"),
                    help="shorthand: --device gpu is --variant gpu")
    ap.add_argument("--repository", help="model repository to install into (default by variant)")
    ap.add_argument("--no-install", action="store_true", help="build the model set only")
    ap.add_argument("--force", action="store_true", help="rebuild even if the model set exists")
    ap.add_argument("--configs-only", action="store_true",
                    help="only regenerate the committed config.pbtxt files from specs.py")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.device == "gpu" and a.variant == "cpu":
        a.variant = "gpu"
    if a.configs_only:
        for p in regenerate_committed_configs():
            print(p.relative_to(REPO_ROOT))
        return 0
    model_dir = Path(a.out or REPO_ROOT / "artifacts" / "models" / a.profile)
    repo = None if a.no_install else Path(a.repository or DEFAULT_REPOSITORY[a.variant])
    m = ensure_model_set(a.profile, model_dir, repo, seed=a.seed, force=a.force, progress=not a.quiet,
                         variant=a.variant)
    q = json.loads((model_dir / "quality.json").read_text())
    print(json.dumps({"timings": m.get("timings"), "recall": q["recall"],
                      "expected_clicks_per_page": q["expected_clicks_per_page"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
