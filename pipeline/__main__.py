"""``python -m pipeline COMMAND ...`` is ``lora-prune COMMAND ...``."""

import sys

from pipeline.cli import main

sys.exit(main())
