"""The run's typed configuration (YAML + dotted overrides) and the DeepSpeed JSON it resolves."""

from pipeline.errors import ConfigError, InputError

__all__ = ["ConfigError", "InputError"]
