"""Model sources, NF4 base + LoRA loading, prunable structure read from ``model.config``, fingerprints."""
