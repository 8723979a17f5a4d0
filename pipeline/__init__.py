"""Prune an LLM's heads and MLP channels while LoRA fine-tuning it under DeepSpeed ZeRO-3, then compact it."""

from pipeline.version import __version__

__all__ = ["__version__"]
