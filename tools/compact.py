"""Merge a run's adapters, remove its pruned units, write the compact model (see --help).

Thin wrapper: the command lives in ``pipeline/cli/compact.py`` (also ``lora-prune compact``).
"""

import sys

from pipeline.cli.compact import main

if __name__ == "__main__":
    sys.exit(main())
