"""Compaction: merge adapters, remove pruned units, write a served layout (stock or Nemotron-NAS), verify, card."""
