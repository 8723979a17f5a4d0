"""The training loop and what it owns: checkpoints, distillation, logging, perf counters, run directory, stops."""
