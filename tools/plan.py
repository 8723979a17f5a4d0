"""Per-GPU memory and communication plan for a run (see --help).

Thin wrapper: the command lives in ``benchmarks/plan.py`` (also ``lora-prune plan``).
"""

import sys

from benchmarks.plan import main

if __name__ == "__main__":
    sys.exit(main())
