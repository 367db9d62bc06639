"""What a `recycle_router` version deploys: the decision parameters from `comrecycle solve`
(λ, c_j, ω, budget, estimator cost) plus the served estimator version they were solved for.

A router version directory holds `params.json` (written by `install_router_params`); a new
λ or a new estimator is a new router version, loaded with explicit model control while the
old one keeps serving.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..specs import N_RECYCLE
from ..errors import UserError

PARAMS_FILE = "params.json"


class ParamsError(UserError):
    """A params file that cannot be deployed (says what was expected and what was found)."""


@dataclass(frozen=True)
class RouterParams:
    lam: float  # λ, the multiplier of the loss budget
    costs: tuple[float, ...]  # c_j of strategies 0..K (strategy 0 = 1.0)
    omega: float = 0.0  # ω > 0: choice from the simplex projection (docs/method.md#rule-options)
    choice: str = "argmax"  # ω > 0: "argmax" or "sample"
    estimator_cost: float = 0.0  # compute units the estimator spends per repeated request
    budget: float | None = None  # the relative loss budget b the λ was solved for
    estimator_version: int = -1  # served estimator version to call (-1 = the latest)
    max_pages: int | None = None  # depth guard: a list that has served this many pages is not recycled
    credit_gains: bool = True  # False: max(ΔQ̂, 0) in the scores (policy.decide.policy_dq)
    loss_floor: float | None = None  # > 0: max(ΔQ̂_j, loss_floor) in the scores (policy.decide.policy_dq)
    strategies: tuple[int, ...] | None = None  # the strategies the rule may use (None = all)
    source: dict = field(default_factory=dict, compare=False)  # the rest of the params file

    @property
    def uses_estimator(self) -> bool:
        """λ = 0 and ω = 0: the scores are -c_j whatever ΔQ̂ is, so the estimator is never called."""
        return self.lam > 0 or self.omega > 0

    def as_decide_params(self) -> dict:
        """The dict comrecycle.policy.decide.decide() takes."""
        return {"lambda": self.lam, "costs": list(self.costs), "omega": self.omega, "choice": self.choice,
                "max_pages": self.max_pages, "credit_gains": self.credit_gains,
                "loss_floor": self.loss_floor,
                "strategies": None if self.strategies is None else list(self.strategies)}

    @classmethod
    def from_dict(cls, p: dict, where: str = "params") -> "RouterParams":
        missing = [k for k in ("lambda", "costs") if k not in p]
        if missing:
            raise ParamsError(f"{where}: missing keys {missing}; expected the output of `comrecycle solve`")
        c = np.asarray(p["costs"], np.float64)
        if c.shape != (N_RECYCLE + 1,) or not np.isfinite(c).all() or (c < 0).any():
            raise ParamsError(f"{where}: 'costs' must be {N_RECYCLE + 1} finite numbers >= 0, got {p['costs']}")
        lam = float(p["lambda"])
        omega = float(p.get("omega", 0.0))
        if not math.isfinite(lam) or lam < 0:
            raise ParamsError(f"{where}: 'lambda' must be a finite number >= 0, got {p['lambda']}")
        if not math.isfinite(omega) or omega < 0:
            raise ParamsError(f"{where}: 'omega' must be a finite number >= 0, got {p.get('omega')}")
        choice = p.get("choice", "argmax")
        if choice not in ("argmax", "sample"):
            raise ParamsError(f"{where}: 'choice' must be 'argmax' or 'sample', got {choice!r}")
        est_cost = float(p.get("estimator_cost", 0.0))
        if not math.isfinite(est_cost) or est_cost < 0:
            raise ParamsError(f"{where}: 'estimator_cost' must be >= 0, got {p.get('estimator_cost')}")
        max_pages = p.get("max_pages")
        if max_pages is not None and (not isinstance(max_pages, int) or max_pages < 1):
            raise ParamsError(f"{where}: 'max_pages' must be null or an integer >= 1, got {max_pages!r}")
        credit_gains = p.get("credit_gains", True)
        if not isinstance(credit_gains, bool):
            raise ParamsError(f"{where}: 'credit_gains' must be true or false, got {credit_gains!r}")
        loss_floor = p.get("loss_floor")
        if loss_floor is not None and (isinstance(loss_floor, bool) or not isinstance(loss_floor, (int, float))
                                       or not math.isfinite(loss_floor) or loss_floor < 0):
            raise ParamsError(f"{where}: 'loss_floor' must be null or a finite number >= 0, got {loss_floor!r}")
        strategies = p.get("strategies")
        if strategies is not None:
            if (not isinstance(strategies, list) or not strategies
                    or not all(isinstance(j, int) and not isinstance(j, bool) and 0 <= j <= N_RECYCLE
                               for j in strategies)):
                raise ParamsError(f"{where}: 'strategies' must be null or a non-empty list of strategy ids in "
                                  f"0..{N_RECYCLE}, got {strategies!r}")
            strategies = tuple(sorted(set(strategies) | {0}))
        return cls(lam=lam, costs=tuple(float(x) for x in c), omega=omega, choice=choice, max_pages=max_pages,
                   strategies=strategies,
                   credit_gains=credit_gains, loss_floor=None if loss_floor is None else float(loss_floor),
                   estimator_cost=est_cost, budget=p.get("budget"),
                   estimator_version=int(p.get("estimator_model_version", -1)), source=p)

    @classmethod
    def load(cls, path: str | Path) -> "RouterParams":
        path = Path(path)
        if not path.exists():
            raise ParamsError(f"{path} does not exist: install params with `comrecycle install-params` "
                              "(or write the output of `comrecycle solve` there)")
        return cls.from_dict(read_params_json(path), str(path))


def read_params_json(path: str | Path, error: type[ValueError] = ParamsError) -> dict:
    """The JSON object of a params file; `error` saying what was expected for anything else
    (a Parquet file, a list, text that is not JSON)."""
    try:
        p = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not a params JSON file (expected the output of `comrecycle solve`): "
                    f"{type(e).__name__}: {str(e)[:120]}") from None
    if not isinstance(p, dict):
        raise error(f"{path}: expected a JSON object (the output of `comrecycle solve`), got {type(p).__name__}")
    return p
