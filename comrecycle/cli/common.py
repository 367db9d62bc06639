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
