"""The ``lora-prune`` command: one entry point, a subcommand per job.

lora-prune train --config CONFIG.yaml [key=value ...]   (under deepspeed/torchrun: see README)
lora-prune validate CONFIG.yaml [key=value ...]
lora-prune compact --run RUN_DIR --out DIR [--verify]
lora-prune evaluate --text FILE --model DIR [--model DIR ...]
lora-prune plan --model MODEL [--nodes N ...]
lora-prune bench --model PATH --train TEXT --eval TEXT
lora-prune --version
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv) -> int, one-line help). Modules import lazily: `validate` and
# `plan` must not pay for torch/DeepSpeed start-up.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("pipeline.cli.train", "prune while fine-tuning (pipeline/run.py)"),
    "validate": (
        "pipeline.config.validate",
        "check a config, its model, data and DeepSpeed JSON without loading weights",
    ),
    "compact": ("pipeline.cli.compact", "merge the adapters, remove pruned units, write the smaller model"),
    "evaluate": ("pipeline.cli.evaluate", "perplexity and speed of models side by side"),
    "plan": ("benchmarks.plan", "per-GPU memory and communication plan"),
    "bench": ("benchmarks.bench_cli", "benchmark the pruning criteria side by side"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "usage: lora-prune COMMAND [ARGS ...]   (lora-prune COMMAND --help)\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from pipeline import __version__

        print(f"lora-prune {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"lora-prune: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, _ = COMMANDS[argv[0]]
    sys.argv[0] = f"lora-prune {argv[0]}"  # argparse's prog in the subcommand's usage lines
    return importlib.import_module(module).main(argv[1:])
