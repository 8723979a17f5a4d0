"""A stand-in for matplotlib that draws nothing (benchmarks/gpu_shims/README.md): every call is accepted."""

from __future__ import annotations

from typing import Any

SHIM = True  # lets a caller tell this stand-in from the real package


class Nothing:
    """Any attribute, call or index gives another Nothing; iterating gives none."""

    def __getattr__(self, name: str) -> Nothing:
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Nothing:
        return self

    def __getitem__(self, key: Any) -> Nothing:
        return self

    def __iter__(self) -> Any:
        return iter(())


def use(backend: str, force: bool = True) -> None:
    pass
