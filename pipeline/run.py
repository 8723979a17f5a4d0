"""Prune while fine-tuning.

deepspeed --num_gpus N pipeline/run.py --config CONFIG.yaml [dotted.key=value ...]
torchrun --nproc_per_node N pipeline/run.py --config CONFIG.yaml
python pipeline/run.py --config CONFIG.yaml          # a single process
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from pipeline.config import InputError, load_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML run config")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # Imported after the config check (bad input fails in seconds), outside the try so that an
    # import error is reported as itself.
    from pipeline import distributed as D
    from pipeline.trainer import RunStopped, Trainer

    try:
        Trainer(cfg).run()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        D.shutdown()
        return e.exit_code
    D.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
