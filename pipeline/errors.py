"""The project's input-error classes and a JSON reader that raises them; imports nothing heavy.

Modules that only need to raise or catch these import this module, not the config schema.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class InputError(ValueError):
    """Bad input (config, model, data, output dir): the message names the key or file and the fix."""


class ConfigError(InputError):
    """Raised for a config that cannot run; the message lists every problem found."""


def read_json(path: str | Path, what: str, error: type[InputError] = InputError) -> Any:
    """Parse the JSON file ``path``; ``what`` names where it is configured (e.g. ``deepspeed.config=...``)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{what}: not valid JSON: {e}") from e
