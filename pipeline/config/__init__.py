"""The run's typed configuration (YAML + dotted overrides) and the DeepSpeed JSON it resolves."""
