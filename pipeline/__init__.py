"""Prune an LLM's heads and MLP channels while LoRA fine-tuning it under DeepSpeed ZeRO-3, then compact it."""

from functools import cache
from typing import Any

__all__ = ["__version__"]


@cache
def _version() -> str:
    from pipeline.version import version

    return version()


def __getattr__(name: str) -> Any:
    # Computed on first use: importing a subpackage (every rank, `lora-prune validate`) runs no git.
    if name == "__version__":
        return _version()
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
