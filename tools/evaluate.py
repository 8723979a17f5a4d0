"""Perplexity and speed of models side by side on the same held-out windows (see --help).

Thin wrapper: the command lives in ``pipeline/cli/evaluate.py`` (also ``lora-prune evaluate``).
"""

import sys

from pipeline.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
