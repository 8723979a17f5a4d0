"""Issue 14: what shrinking in flight (``pruning.shrink``) buys, measured side by side on whole runs.

Each run is the real CLI under the DeepSpeed launcher (2 CPU ranks over gloo, or the GPUs), one after
another and, with ``--repeats``, interleaved, so that the ratios compare runs under the same load:
  masked              the run as before: pruned units stay in the model at mask 0 (pruning.shrink=off)
  shrink_final        cut at the final decision, o/down columns re-quantized (pruning.shrink=final)
  shrink_final_dense  the same, o/down columns kept dense (exact)
  shrink_every        cut at every decision (re-quantized)
  plain_lora          no pruning, no distillation: LoRA fine-tuning of the dense model
For each: wall time of the whole command (start-up, loading, both evaluations, saving), median step time up
to and after the final decision, the tensor memory of a step before and after the cut (perf.memory,
perf.memory_after_shrink), the process peak (peak_memory_mb), the run's held-out perplexity (its data.eval),
and with ``--tune-text`` the perplexity of its compact export on that text (the half of the validation text
the defaults are chosen on).

  python -m benchmarks.shrink_speed --config configs/vimdoc.yaml --out runs/shrink-speed \\
      [--ranks 2] [--repeats 1] [--runs masked,shrink_final] [--tune-text FILE] [--set key=value ...]

Writes OUT/report.json and OUT/report.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RUNS: dict[str, list[str]] = {
    "masked": ["pruning.shrink=off"],
    "shrink_final": ["pruning.shrink=final", "pruning.shrink_columns=requantize"],
    "shrink_final_dense": ["pruning.shrink=final", "pruning.shrink_columns=dense"],
    "shrink_every": ["pruning.shrink=every_decision", "pruning.shrink_columns=requantize"],
    "plain_lora": ["pruning.target_sparsity=0", "distill.enabled=false"],
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(config: str, out: Path, overrides: list[str], ranks: int) -> float:
    """One whole run; returns its wall time in seconds."""
    env = dict(os.environ)
    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:
        gpu = False
    if not gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(_port())]
    args = ["--config", config, *overrides, f"output.dir={out}", "output.overwrite=true", "logging.report_to=none"]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*cmd, str(ROOT / "pipeline" / "run.py"), *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run {out} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return wall


def tune_ppl(run: Path, text: str, seq_len: int, max_tokens: int) -> float:
    """Perplexity of the run's compact export (merged into the NF4 weights it trained against) on ``text``."""
    export, report = run / "export", run / "tune.json"
    tool = [sys.executable, str(ROOT / "tools" / "compact.py"), "--run", str(run), "--out", str(export)]
    subprocess.run([*tool, "--merge-into", "dequantized", "--overwrite"], cwd=ROOT, check=True, capture_output=True)
    tool = [sys.executable, str(ROOT / "tools" / "evaluate.py"), "--model", str(export), "--text", text]
    args = ["--seq-len", str(seq_len), "--max-tokens", str(max_tokens), "--speed-batch", "0", "--json", str(report)]
    subprocess.run([*tool, *args], cwd=ROOT, check=True, capture_output=True)
    return json.loads(report.read_text())[str(export)]["ppl"]


def measure(run: Path, wall: float) -> dict[str, Any]:
    s = json.loads((run / "summary.json").read_text())
    perf = s["perf"]
    mem, after = perf.get("memory", {}), perf.get("memory_after_shrink", {})
    return {
        "wall_s": wall,
        "step_s_to_final": perf.get("step_s_median_to_final_decision"),
        "step_s_after_final": perf.get("step_s_median_after_final_decision"),
        "step_peak_mb": mem.get("step_peak_mb"),
        "step_peak_mb_after_shrink": after.get("step_peak_mb"),
        # Model + optimizer tensors held (the CPU figures also hold DeepSpeed's whole-size reduce bucket).
        "held_mb": _held(mem),
        "held_mb_after_shrink": _held(after),
        "peak_memory_mb": s["peak_memory_mb"],
        "eval_ppl": s["eval_ppl_after"],
        "shrink_s": s.get("shrink", {}).get("seconds"),
        "shrink_steps": s.get("shrink", {}).get("steps"),
        "achieved_sparsity": s["achieved_sparsity"],
        "trainable_params_end": perf["trainable_params"],
    }


def _held(mem: dict[str, Any]) -> float | None:
    kinds = mem.get("resident_by_kind_mb")
    return kinds["model"] + kinds["optimizer"] if kinds else None


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def report_md(results: dict[str, list[dict[str, Any]]], ref: str) -> str:
    cols = [
        ("wall_s", "wall s", ".1f"),
        ("step_s_to_final", "step s to final decision", ".3f"),
        ("step_s_after_final", "step s after", ".3f"),
        ("step_peak_mb", "step MB before", ".0f"),
        ("step_peak_mb_after_shrink", "step MB after cut", ".0f"),
        ("held_mb", "model+optimizer MB before", ".2f"),
        ("held_mb_after_shrink", "after cut", ".2f"),
        ("peak_memory_mb", "peak MB", ".0f"),
        ("eval_ppl", "ppl (run's eval)", ".2f"),
        ("tune_ppl", "ppl (tune half)", ".2f"),
        ("shrink_s", "cut s", ".1f"),
    ]
    lines = ["| run | " + " | ".join(c[1] for c in cols) + " | wall x " + ref + " |"]
    lines.append("|---" * (len(cols) + 2) + "|")
    base = _mean(results[ref], "wall_s") if ref in results else None
    for name, rows in results.items():
        cells = []
        for key, _, fmt in cols:
            v = _mean(rows, key)
            cells.append("" if v is None else format(v, fmt))
        w = _mean(rows, "wall_s")
        ratio = f"{w / base:.3f}" if base and w else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    ap.add_argument("--tune-text", default=None, help="also the perplexity of each export on this text")
    ap.add_argument("--tune-seq-len", type=int, default=256)
    ap.add_argument("--tune-max-tokens", type=int, default=40000)
    ap.add_argument("--set", action="append", default=[], help="override for every run (key=value)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        ap.error(f"--runs: unknown {unknown}; choose from {', '.join(RUNS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(args.repeats):
        order = names if r % 2 == 0 else names[::-1]  # interleaved: drift hits every run alike
        for name in order:
            run = out / f"{name}-{r}"
            wall = train(args.config, run, [*RUNS[name], *args.set], args.ranks)
            row = measure(run, wall)
            if args.tune_text:
                row["tune_ppl"] = tune_ppl(run, args.tune_text, args.tune_seq_len, args.tune_max_tokens)
            results[name].append(row)
            print(f"{name} #{r}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
            (out / "report.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    ref = "masked" if "masked" in results else names[0]
    md = report_md(results, ref)
    (out / "report.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
