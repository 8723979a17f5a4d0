"""Prune while fine-tuning.

deepspeed --num_gpus N pipeline/run.py --config CONFIG.yaml [dotted.key=value ...]
torchrun --nproc_per_node N pipeline/run.py --config CONFIG.yaml
python pipeline/run.py --config CONFIG.yaml          # a single process
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from pipeline.config import validate
from pipeline.config.schema import load_config
from pipeline.errors import ConfigError, InputError
from pipeline.train.stops import BEFORE_LOOP, STOP_SIGNALS, RunStopped, stop_outside_the_loop


def _check_not_overwritten(config: str, out_dir: str) -> None:
    """The run writes its resolved config into output.dir; refuse to read the config from that very file."""
    from pipeline.train.checkpoint import RUN_CONFIG
    from pipeline.train.rundir import INCOMING

    given = Path(config).resolve()
    for target in (Path(out_dir) / RUN_CONFIG, Path(out_dir) / INCOMING / RUN_CONFIG):
        if target.resolve() == given:
            raise ConfigError(
                f"--config {config} is the file this run writes its resolved config to; copy it elsewhere "
                "and pass the copy (or use another output.dir)"
            )


def main(argv: list[str] | None = None) -> int:
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    stop_outside_the_loop(BEFORE_LOOP)  # SIGTERM/SIGINT during start-up: exit 75 with a message
    try:
        return _main(argv)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def _main(argv: list[str] | None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML run config")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = ap.parse_args(argv)
    trainer = None
    try:
        cfg = load_config(args.config, args.overrides)
        _check_not_overwritten(args.config, cfg.output.dir)
        # The validate command's checks (model directory, data files, DeepSpeed JSON) before any rank
        # initialises the process group or loads a weight: every rank exits 2, rank 0 says why.
        validate.check(args.config, args.overrides)
        from pipeline.train.trainer import Trainer

        trainer = Trainer(cfg)
        trainer.run()
    except InputError as e:
        if os.environ.get("RANK", "0") == "0":  # set by deepspeed/torchrun; unset for a single process
            print(f"error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        _shutdown()
        return e.exit_code
    finally:
        if trainer is not None:
            trainer.close()
    _shutdown()
    return 0


def _shutdown() -> None:
    if "pipeline.dist.comm" in sys.modules:  # not imported when stopped before start-up
        from pipeline.dist import comm as D

        D.shutdown()
