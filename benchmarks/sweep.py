"""Run a grid of pipeline runs side by side and tabulate held-out perplexity and time.

python benchmarks/sweep.py --config configs/vimdoc.yaml --out runs/sweep [--jobs 2] [--threads 1]
    [--set key=value ...] --run NAME "key=value key=value" [--run NAME "..." ...]

Each run is pipeline/run.py in one process (benchmarks/bench.py's launcher: its own memory and
timing, finished runs with unchanged arguments reused). Writes OUT/sweep.md and OUT/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from benchmarks.bench import BenchSettings, RunSpec, run_all
from pipeline.config.schema import InputError, load_config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", dest="common", action="append", default=[], help="dotted.key=value for every run")
    ap.add_argument("--run", nargs=2, action="append", metavar=("NAME", "OVERRIDES"), required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        specs = [RunSpec(n, "sweep", None, None, 0.0, "", tuple(shlex.split(o))) for n, o in args.run]
        for s in specs:  # every config, before any run starts
            load_config(args.config, [*args.common, *s.overrides, f"output.dir={out / 'runs' / s.name}"])
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    st = BenchSettings(model="", train="", eval="", out=str(out), threads=args.threads, overrides=tuple(args.common))
    base = Path(args.config).resolve()
    results = run_all(specs, st, base, lambda m: print(m, flush=True), args.jobs)
    rows = []
    for name, r in results.items():
        s = r.summary
        perf = s.get("perf", {}) if s else {}
        rows.append(
            {
                "name": name,
                "overrides": " ".join(r.spec.overrides),
                "status": r.status if r.ok else r.error,
                "eval_ppl_after": s.get("eval_ppl_after") if s else None,
                "achieved_sparsity": s.get("achieved_sparsity") if s else None,
                "seconds": round(r.seconds, 1),
                "step_s_median": perf.get("step_s_median"),
                "peak_memory_mb": s.get("peak_memory_mb") if s else None,
                "step_tensor_peak_mb": perf.get("memory", {}).get("step_peak_mb"),
                "teacher_time_share": (s.get("distill") or {}).get("teacher_time_share") if s else None,
            }
        )
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    lines = [
        "| run | ppl after | sparsity | step s (median) | step tensor peak MB | process peak MB | teacher share "
        "| overrides |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def num(v: Any, fmt: str) -> str:
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    for row in rows:
        ppl = num(row["eval_ppl_after"], ".2f") if row["eval_ppl_after"] else row["status"]
        lines.append(
            f"| {row['name']} | {ppl} | {num(row['achieved_sparsity'], '.3f')} | {num(row['step_s_median'], '.3f')} "
            f"| {num(row['step_tensor_peak_mb'], '.0f')} "
            f"| {num(row['peak_memory_mb'], '.0f')} | {num(row['teacher_time_share'], '.2f')} | `{row['overrides']}` |"
        )
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
