"""Prune while fine-tuning.

deepspeed --num_gpus N pipeline/run.py --config CONFIG.yaml [dotted.key=value ...]
torchrun --nproc_per_node N pipeline/run.py --config CONFIG.yaml
python pipeline/run.py --config CONFIG.yaml          # a single process

Thin wrapper: the command lives in ``pipeline/cli/train.py`` (also ``lora-prune train``).
"""

import sys

from pipeline.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
