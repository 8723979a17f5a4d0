"""Perplexity and forward speed of models side by side, on the same held-out windows.

python tools/evaluate.py --text ../shared/data/vimdoc/valid.txt --model DENSE_DIR --model COMPACT_DIR
    [--seq-len 256] [--max-tokens 40000] [--format auto|text|alpaca|chat] [--text-field text] [--no-packing]
    [--speed-batch 8] [--repeats 15] [--threads N]
    [--lm-eval-tasks hellaswag,arc_easy [--lm-eval-limit N] [--lm-eval-batch-size 8] [--lm-eval-include-path DIR]]
    [--strided [--window 2048] [--stride 0]] [--json OUT.json]
    [--engine vllm [--vllm-python PATH] [--gen-tokens 32] [--gen-batch 8]]

The first --model is the reference for the speed ratio. Tokenized with the first model's tokenizer,
into the windows training's data.eval gives (same format detection and prompt masking), so the
perplexity of a compact model is comparable with the run's eval_ppl_after. Models with their own
modeling code (per-layer widths, an auto_map in config.json) load with trust_remote_code; no other does.
--lm-eval-tasks also runs those
lm-evaluation-harness tasks on every model and prints them side by side (needs `pip install -e '.[eval]'`
and the tasks' data; --lm-eval-include-path adds a folder of task YAMLs of your own). --strided also
prints the wikitext-style perplexity of the whole --text file (pipeline/evaluation.strided_perplexity:
tokenized once, windows of --window tokens every --stride tokens, 0 = non-overlapping as the papers
report). --json writes every figure to a file.

--engine vllm measures the models as vLLM serves them (tools/vllm_generate.py in vLLM's own
environment: --vllm-python, default $VLLM_PYTHON or .venv-vllm/bin/python): perplexity on the same
windows from vLLM's prompt_logprobs (packed windows are split at document starts, whose first token
carries no loss, so the figure equals the transformers one up to numerics) and greedy generation
tokens/s (--gen-batch requests of --gen-tokens each).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config.schema import DATA_FORMATS, InputError
from pipeline.data.dataset import IGNORE, Windows
from pipeline.export.compact import BaseWeights
from pipeline.export.verify import forward_speed, n_params
from pipeline.model.source import resolve_model_dir
from pipeline.train.checkpoint import dumps
from pipeline.train.evaluation import (
    STRIDED_WINDOW,
    eval_windows,
    lm_eval_task_manager,
    perplexity,
    run_lm_eval,
    strided_perplexity,
)

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="model directory (repeatable)")
    ap.add_argument("--text", required=True, help="held-out text file")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=40000)
    ap.add_argument("--speed-batch", type=int, default=8, help="windows per timed forward (0 = no timing)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--format", default="auto", choices=DATA_FORMATS, help="as data.format")
    ap.add_argument("--text-field", default="text", help="as data.text_field")
    ap.add_argument("--no-packing", action="store_true", help="as data.packing=false: one padded row per example")
    ap.add_argument("--lm-eval-tasks", default="", help="comma-separated lm-evaluation-harness tasks")
    ap.add_argument("--lm-eval-limit", type=float, default=None, help="examples per task (or a fraction)")
    ap.add_argument("--lm-eval-batch-size", type=int, default=8)
    ap.add_argument("--lm-eval-include-path", default="", help="folder of extra lm-eval task YAMLs")
    ap.add_argument("--strided", action="store_true", help="also the strided perplexity of the whole --text file")
    ap.add_argument("--window", type=int, default=STRIDED_WINDOW, help=f"strided window (default {STRIDED_WINDOW})")
    ap.add_argument("--stride", type=int, default=0, help="strided stride (default 0 = --window: no overlap)")
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    ap.add_argument("--engine", default="transformers", choices=("transformers", "vllm"))
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python")))
    ap.add_argument("--gen-tokens", type=int, default=32, help="vllm: new tokens per timed request")
    ap.add_argument("--gen-batch", type=int, default=8, help="vllm: requests per timed generation (0 = no timing)")
    args = ap.parse_args(argv)
    tasks = [t.strip() for t in args.lm_eval_tasks.split(",") if t.strip()]
    tm = None
    errs: list[str] = []  # everything is checked, and every problem reported, before any model loads
    try:
        model_dirs = check_inputs(args)
    except InputError as e:
        errs.append(str(e))
    if tasks:
        try:
            tm = lm_eval_task_manager(tasks, args.lm_eval_include_path, key="--lm-eval-tasks")
        except InputError as e:
            errs.append(str(e))
    if errs:
        print("error: " + "; ".join(errs), file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(model_dirs[args.model[0]])
    try:
        packing = not args.no_packing
        windows = eval_windows(args.text, tok, args.seq_len, args.max_tokens, args.format, args.text_field, packing)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_tok = windows.input_ids.numel() if windows.attention_mask is None else int(windows.attention_mask.sum())
    print(f"{args.text}: {n_tok} tokens, {len(windows)} windows of {args.seq_len}")
    if args.engine == "vllm":
        report = vllm_report(args, model_dirs, windows)
        if args.json:
            Path(args.json).write_text(dumps(report, indent=2))
        return 0
    models = {
        m: AutoModelForCausalLM.from_pretrained(d, trust_remote_code=needs_remote_code(d)).eval()
        for m, d in model_dirs.items()
    }
    x = windows.input_ids[: args.speed_batch].long()
    speed = forward_speed(models, x, repeats=args.repeats) if args.speed_batch else {}
    ref = args.model[0]
    report: dict[str, dict] = {}
    for name, model in models.items():
        loss, ppl = perplexity(model, windows)
        report[name] = {"params": n_params(model), "loss": loss, "ppl": ppl}
        line = f"{name}: params {n_params(model):,}  loss {loss:.4f}  ppl {ppl:.2f}"
        if speed:
            report[name]["tokens_per_s"] = speed[name]
            line += f"  {speed[name]:.0f} tok/s (x{speed[name] / speed[ref]:.2f} vs {Path(ref).name})"
        if args.strided:
            s_loss, s_ppl, n = strided_perplexity(model, tok, args.text, args.window, args.stride)
            report[name]["strided"] = {"loss": s_loss, "ppl": s_ppl, "tokens": n, "window": args.window}
            line += f"  strided ppl {s_ppl:.2f} ({n} tokens, window {args.window}, stride {args.stride or args.window})"
        print(line)
    if tasks:
        for name, model in models.items():
            report[name]["lm_eval"] = run_lm_eval(
                model, tok, tasks, args.lm_eval_limit, args.lm_eval_batch_size, task_manager=tm
            )
        print(lm_eval_table(report))
    if args.json:
        Path(args.json).write_text(dumps(report, indent=2))
    return 0


def vllm_segments(windows: Windows) -> tuple[list[list[int]], list[list[bool]]]:
    """Each window as vLLM prompts: split at packed document starts (position 0), padding dropped;
    with, per token, whether it is a target (predicted from the tokens before it in its segment)."""
    prompts, targets = [], []
    for i in range(len(windows)):
        ids, labels = windows.input_ids[i], windows.labels[i]
        keep = torch.ones_like(ids, dtype=torch.bool)
        if windows.attention_mask is not None:
            keep = windows.attention_mask[i].bool()
        starts = [0]
        if windows.position_ids is not None:
            starts = [int(t) for t in torch.nonzero(windows.position_ids[i] == 0).flatten()] or [0]
            if starts[0] != 0:
                starts = [0, *starts]
        for a, b in zip(starts, [*starts[1:], len(ids)], strict=True):
            seg = [j for j in range(a, b) if keep[j]]
            if len(seg) < 2:
                continue
            prompts.append([int(ids[j]) for j in seg])
            targets.append([False] + [bool(labels[j] != IGNORE) for j in seg[1:]])
    return prompts, targets


def vllm_report(args: argparse.Namespace, model_dirs: dict[str, Path], windows: Windows) -> dict[str, dict]:
    """Perplexity and generation speed of every model in vLLM, one vLLM process for all of them."""
    prompts, targets = vllm_segments(windows)
    with tempfile.TemporaryDirectory() as tmp:
        pfile = Path(tmp) / "prompts.json"
        pfile.write_text(json.dumps(prompts))
        cmd = [args.vllm_python, str(ROOT / "tools" / "vllm_generate.py"), "--prompts", str(pfile), "--score"]
        cmd += ["--max-new-tokens", str(args.gen_tokens), "--gen-batch", str(args.gen_batch)]
        outs = {m: Path(tmp) / f"out{i}.json" for i, m in enumerate(model_dirs)}
        for m, d in model_dirs.items():
            cmd += ["--model", str(d), "--out", str(outs[m])]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        env.pop("PYTHONPATH", None)  # vLLM's environment, not this one
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"error: vLLM failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        results = {m: json.loads(outs[m].read_text()) for m in model_dirs}
    report: dict[str, dict] = {}
    ref = args.model[0]
    for m, r in results.items():
        nll = count = 0
        for lps, tgt in zip(r["prompt_logprobs"], targets, strict=True):
            for lp, t in zip(lps, tgt, strict=True):
                if t:
                    nll -= lp
                    count += 1
        loss = nll / count
        params = BaseWeights(model_dirs[m]).numel()  # from the safetensors headers: no weights loaded
        report[m] = {"engine": "vllm", "params": params, "loss": loss, "ppl": math.exp(loss)}
        line = f"{m}: params {report[m]['params']:,}  loss {loss:.4f}  ppl {math.exp(loss):.2f} (vLLM)"
        if "generate_tokens_per_s" in r:
            g, g_ref = r["generate_tokens_per_s"], results[ref]["generate_tokens_per_s"]
            report[m]["generate_tokens_per_s"] = g
            line += f"  generation {g:.0f} tok/s (x{g / g_ref:.2f} vs {Path(ref).name})"
        print(line)
    return report


def needs_remote_code(model_dir: Path) -> bool:
    """Only a model with its own modeling code (compact's per-layer widths) loads with trust_remote_code;
    passing it to every model makes transformers prompt interactively for some of them."""
    conf = json.loads((Path(model_dir) / "config.json").read_text())
    return bool(conf.get("auto_map"))


def check_inputs(args: argparse.Namespace) -> dict[str, Path]:
    """Each --model as a local model directory, and --seq-len within every model's context."""
    errs: list[str] = []
    dirs: dict[str, Path] = {}
    for m in args.model:
        try:
            dirs[m] = resolve_model_dir(m, key="--model")
        except InputError as e:
            errs.append(str(e))
    if args.seq_len < 2:
        errs.append(f"--seq-len {args.seq_len}: must be >= 2")
    for m, d in dirs.items():
        ctx = json.loads((d / "config.json").read_text()).get("max_position_embeddings")
        if isinstance(ctx, int) and args.seq_len > ctx:
            errs.append(f"--seq-len {args.seq_len} exceeds the context of --model {m} ({ctx} positions); lower it")
    if args.strided and args.window < 2:
        errs.append(f"--window {args.window}: must be >= 2")
    if not Path(args.text).is_file():
        errs.append(f"--text {args.text}: no such file")
    if args.engine == "vllm":
        if not Path(args.vllm_python).is_file():
            errs.append(
                f"--vllm-python {args.vllm_python}: no such file; build vLLM's environment as in the README's "
                "Serving section, or set VLLM_PYTHON"
            )
        if args.strided or args.lm_eval_tasks:
            errs.append("--engine vllm measures perplexity and generation speed only; drop --strided / --lm-eval-tasks")
        if args.gen_tokens < 1 or args.gen_batch < 0:
            errs.append(f"--gen-tokens {args.gen_tokens} must be >= 1 and --gen-batch {args.gen_batch} >= 0")
    if errs:
        raise InputError("; ".join(errs))
    return dirs


def lm_eval_table(report: dict[str, dict]) -> str:
    """lm-eval metrics side by side: a row per task and metric, a column per model (the first is the reference)."""
    names = list(report)
    head = "| task | metric | " + " | ".join(Path(n).name for n in names) + " |"
    lines = [head, "|---|---|" + "---|" * len(names)]
    first = report[names[0]]["lm_eval"]
    for task, metrics in first.items():
        for metric in metrics:
            if "_stderr" in metric:
                continue
            cells = [report[n]["lm_eval"].get(task, {}).get(metric) for n in names]
            lines.append(f"| {task} | {metric} | " + " | ".join("-" if c is None else f"{c:.4f}" for c in cells) + " |")
    return "\n".join(lines)
