"""``matplotlib.pyplot`` of the stand-in: figures and axes that accept every call and save nothing."""

from __future__ import annotations

from typing import Any

from matplotlib import Nothing


def subplots(nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Nothing, Any]:
    if nrows == 1 and ncols == 1:
        return Nothing(), Nothing()
    if nrows == 1 or ncols == 1:
        return Nothing(), [Nothing() for _ in range(nrows * ncols)]
    return Nothing(), [[Nothing() for _ in range(ncols)] for _ in range(nrows)]


def __getattr__(name: str) -> Nothing:
    return Nothing()
