"""`comrecycle` — the project's one console script.

  comrecycle simulate       write a simulated request log (docs/contracts.md#request-log-schema)
  comrecycle check-simulator  the simulator's calibration guards on a randomised log (ground truth q_j)
  comrecycle build-models   train the four stages, export ONNX, install the model repository
  comrecycle train-estimator  fit + evaluate the effect-loss estimator on a randomised log
  comrecycle calibrate-estimator  per-depth calibration of ΔQ̂ on a held-out randomised log
  comrecycle solve          λ for a loss budget (estimator + log) -> params JSON
  comrecycle decide         one strategy per logged request with those params
  comrecycle evaluate       off-policy compute saved / effect loss (IPW, SNIPW, DR, exact)
  comrecycle frontier       compute saved vs loss of every policy on a log (table + PNG)
  comrecycle closed-loop    a policy inside the simulator: realised loss on its own cache states
  comrecycle closed-loop-frontier  every policy family over its knob and seeds, in the closed loop
  comrecycle profile-costs  re-measure per-stage cost and the strategy cost profile c_j
  comrecycle install-estimator  install a trained estimator as a new `estimator` version
  comrecycle install-params  install router params (solve) as a new `recycle_router` version
  comrecycle serve          run the embedded tritonserver on a model repository (--with-redis)
  comrecycle replay         replay simulated sessions against a running server
  comrecycle perf           perf_analyzer on `cascade` and the trivial-model floor (CSV)
  comrecycle demo           the main job: build if needed, serve, replay, report
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

from ..errors import ComRecycleError, UserError
from . import closed_loop, models, policy, serving, sim
from .common import default_model_dir

log = logging.getLogger("comrecycle")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="comrecycle", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    sim.add_parsers(sub)
    models.add_parsers(sub)
    policy.add_parsers(sub, str(default_model_dir("default") / "cost_profile.json"))
    closed_loop.add_parsers(sub)
    serving.add_parsers(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    a, unknown = ap.parse_known_args(argv)
    if unknown:
        if hasattr(a, "rest"):  # perf, build-models: their own options go after `--`
            ap.error(f"unrecognized arguments: {' '.join(unknown)}; the options of `comrecycle {a.command}` go "
                     f"after `--`: comrecycle {a.command} -- {' '.join(unknown + list(a.rest or []))}")
        ap.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(a, "rest", None) and a.rest[:1] == ["--"]:
        a.rest = a.rest[1:]
    t0 = time.time()
    try:
        rc = a.func(a)
    except (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        print(f"comrecycle {a.command}: error: {e}", file=sys.stderr)  # bad input: one line, exit 2
        return 2
    except ComRecycleError as e:  # a part failed (server, cache, tool): its own message, exit 1
        print(f"comrecycle {a.command}: failed: {e}", file=sys.stderr)
        return 1
    # anything else is a bug: it propagates with its traceback
    log.debug("%s took %.1fs", a.command, time.time() - t0)
    return rc


if __name__ == "__main__":
    sys.exit(main())
