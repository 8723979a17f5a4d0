"""``matplotlib.ticker`` of the stand-in."""

from __future__ import annotations

from typing import Any

from matplotlib import Nothing


def __getattr__(name: str) -> Any:
    return Nothing()
