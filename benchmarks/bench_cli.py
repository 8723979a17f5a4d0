"""Benchmark the pruning criteria side by side: quality, memory, speed and communication.

python tools/bench.py --model PATH --train TEXT --eval TEXT [--sparsities 0.2,0.5] [--steps N] [--out DIR]
    [--criteria lora,full_grad,taylor,magnitude,random,lora_fp32] [--scopes global,uniform]
    [--calib-steps 8] [--seed 0] [--jobs 2] [--threads 1] [--ds-config JSON] [--set key=value ...]
    [--speed-steps 20] [--speed-batch 8] [--speed-repeats 15] [--comm-world 2] [--report-only] [--no-progress]

On the same model, data, steps and seed, for every criterion, scope and sparsity: held-out
perplexity before pruning, right after masking (one-shot) and after pruning while fine-tuning,
with dense LoRA fine-tuning as the ceiling; tensor memory of a training step with scoring; the
step-time overhead of pruning; forward tokens/s of the compact models against the dense one; and
the all-reduced bytes per scoring event. Writes DIR/report.md, DIR/results.json, DIR/quality.png
and DIR/layers.png; every run's directory and log is under DIR/runs and DIR/logs, and finished
runs with unchanged settings are reused when the command is repeated (changes to the code are not
detected: delete DIR/runs to rerun everything). See benchmarks/bench.py and docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from pipeline.errors import InputError


def _list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in _list(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, e.g. 0.2,0.5 ({e})") from e


def main(argv: list[str] | None = None) -> int:
    from benchmarks.bench import METHODS, SCOPES, BenchSettings

    defaults = BenchSettings(model="", train="", eval="")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--train", required=True, help="training text/data file (as data.train)")
    ap.add_argument("--eval", required=True, help="held-out text/data file (as data.eval)")
    ap.add_argument("--out", default=defaults.out, help=f"output directory (default {defaults.out})")
    ap.add_argument("--sparsities", type=_floats, default=defaults.sparsities, help="default 0.2,0.5")
    ap.add_argument("--steps", type=int, default=defaults.steps, help=f"optimizer steps per run ({defaults.steps})")
    ap.add_argument(
        "--criteria", type=_list, default=defaults.methods, help=f"subset of {','.join(METHODS)} (default: all)"
    )
    ap.add_argument("--scopes", type=_list, default=defaults.scopes, help=f"subset of {','.join(SCOPES)}")
    ap.add_argument("--calib-steps", type=int, default=defaults.calib_steps, help="one-shot scoring steps (8)")
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--jobs", type=int, default=defaults.jobs, help="training runs at once (2)")
    ap.add_argument("--threads", type=int, default=defaults.threads, help="torch threads per run (1)")
    ap.add_argument("--ds-config", default=defaults.ds_config, help="DeepSpeed config for every run")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="dotted.key=value for every run")
    ap.add_argument("--speed-steps", type=int, default=defaults.speed_steps, help="steps per timed pair (20)")
    ap.add_argument("--speed-batch", type=int, default=defaults.speed_batch, help="windows per timed forward (8)")
    ap.add_argument("--speed-repeats", type=int, default=defaults.speed_repeats, help="timed forwards (15)")
    ap.add_argument("--comm-world", type=int, default=defaults.comm_world, help="ranks for planned traffic (2)")
    ap.add_argument("--report-only", action="store_true", help="rewrite report.md and plots from results.json")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        if args.report_only:
            from benchmarks.report import rewrite

            if not (Path(args.out) / "results.json").is_file():
                raise InputError(
                    f"--report-only: {Path(args.out) / 'results.json'} does not exist; run the bench first"
                )
            rewrite(Path(args.out))
            print(f"wrote {Path(args.out) / 'report.md'}")
            return 0
        from benchmarks.bench import run_bench

        st = BenchSettings(
            model=args.model,
            train=args.train,
            eval=args.eval,
            out=args.out,
            sparsities=args.sparsities,
            methods=args.criteria,
            scopes=args.scopes,
            steps=args.steps,
            calib_steps=args.calib_steps,
            seed=args.seed,
            jobs=args.jobs,
            threads=args.threads,
            ds_config=args.ds_config,
            overrides=tuple(args.overrides),
            speed_steps=args.speed_steps,
            speed_batch=args.speed_batch,
            speed_repeats=args.speed_repeats,
            comm_world=args.comm_world,
        )
        command = " ".join(shlex.quote(a) for a in ["python", "tools/bench.py", *(argv or sys.argv[1:])])
        results = run_bench(st, command, progress_bar=not args.no_progress)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(st.out)
    print(f"wrote {out / 'report.md'}, {out / 'results.json'} ({results['wall']['total_s'] / 60:.1f} min)")
    for name in results["failed"]:
        print(f"error: run {name} failed: {results['runs'][name]['error']}", file=sys.stderr)
    return 1 if results["failed"] else 0
