"""``__version__``: the package version, plus the git commit when the code runs from a checkout.

It goes into summary.json, checkpoints and model cards, so a run says which code produced it.
"""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


def _release() -> str:
    try:
        return metadata.version("lora-prune-pipeline")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0+unknown"


def _commit() -> str | None:
    """Short commit of the checkout holding this file, with ``.dirty`` for uncommitted changes; None elsewhere."""
    if not (_ROOT / ".git").exists():  # an installed wheel, or a copy without history
        return None
    try:
        git = ["git", "-C", str(_ROOT)]
        sha = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10
        )
        return sha.stdout.strip() + (".dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def version() -> str:
    commit = _commit()
    return f"{_release()}+g{commit}" if commit else _release()
