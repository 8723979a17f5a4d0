"""Benchmark the pruning criteria side by side (see --help).

Thin wrapper: the command lives in ``benchmarks/bench_cli.py`` (also ``lora-prune bench``).
"""

import sys

from benchmarks.bench_cli import main

if __name__ == "__main__":
    sys.exit(main())
