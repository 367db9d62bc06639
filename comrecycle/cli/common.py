"""What every command module shares: where artefacts go and the CLI's user error."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..repository import REPO_ROOT

ARTIFACTS = REPO_ROOT / "artifacts"


def default_model_dir(profile: str) -> Path:
    return ARTIFACTS / "models" / profile


class CliError(UserError):
    """A user error: printed without a traceback, exit code 2."""


def budgets_pct(text: str | None, flag: str = "--budgets") -> list[float]:
    """Loss budgets in percent from "0.5,1,2" (empty for None)."""
    if text is None:
        return []
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise CliError(f"{flag}: expected budgets in % separated by commas, e.g. 0.5,1,2; got {text!r}") from None
    bad = [v for v in values if not 0 <= v < 100]
    if bad:
        raise CliError(f"{flag}: expected percentages in [0, 100), got {bad}")
    return values


def is_true_q_estimator(estimator_dir) -> bool:
    """Whether an estimator directory's manifest says it was trained with label true-q (a
    simulator's exact q_j); False when there is none or it cannot be read."""
    import json

    from ..estimator.labels import TRUE_Q

    try:
        label = json.loads((Path(estimator_dir) / "manifest.json").read_text())["params"].get("label")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return label == TRUE_Q


def refuse_to_serve_true_q(estimator_dir) -> None:
    """An estimator fitted to a simulator's exact q_j (label true-q) is a feature ceiling for
    evaluation; serving it would claim savings that no logged traffic can train."""
    if is_true_q_estimator(estimator_dir):
        raise CliError(f"{estimator_dir} was trained with --label true-q (a simulator's exact q_j): it is the feature "
                       f"ceiling of the estimator's inputs, for evaluation only, and is not installed for serving")
