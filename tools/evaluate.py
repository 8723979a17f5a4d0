"""Perplexity and forward speed of models side by side, on the same held-out windows.

python tools/evaluate.py --text ../shared/data/vimdoc/valid.txt --model DENSE_DIR --model COMPACT_DIR
    [--seq-len 256] [--max-tokens 40000] [--format auto|text|alpaca|chat] [--text-field text] [--no-packing]
    [--speed-batch 8] [--repeats 15] [--threads N]
    [--lm-eval-tasks hellaswag,arc_easy [--lm-eval-limit N] [--lm-eval-batch-size 8]]

The first --model is the reference for the speed ratio. Tokenized with the first model's tokenizer,
into the windows training's data.eval gives (same format detection and prompt masking), so the
perplexity of a compact model is comparable with the run's eval_ppl_after. Models with their own
modeling code (per-layer widths) load with trust_remote_code. --lm-eval-tasks also runs those
lm-evaluation-harness tasks on every model (needs `pip install 'lm_eval[hf]'` and the tasks' data).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import DATA_FORMATS, InputError
from pipeline.evaluation import LM_EVAL_MISSING, eval_windows, lm_eval_available, perplexity, run_lm_eval
from pipeline.export_verify import forward_speed, n_params


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
    args = ap.parse_args(argv)
    tasks = [t.strip() for t in args.lm_eval_tasks.split(",") if t.strip()]
    if tasks and not lm_eval_available():  # before loading any model
        print(f"error: --lm-eval-tasks: {LM_EVAL_MISSING}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model[0])
    try:
        packing = not args.no_packing
        windows = eval_windows(args.text, tok, args.seq_len, args.max_tokens, args.format, args.text_field, packing)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n_tok = windows.input_ids.numel() if windows.attention_mask is None else int(windows.attention_mask.sum())
    print(f"{args.text}: {n_tok} tokens, {len(windows)} windows of {args.seq_len}")
    models = {m: AutoModelForCausalLM.from_pretrained(m, trust_remote_code=True).eval() for m in args.model}
    x = windows.input_ids[: args.speed_batch].long()
    speed = forward_speed(models, x, repeats=args.repeats) if args.speed_batch else {}
    ref = args.model[0]
    for name, model in models.items():
        loss, ppl = perplexity(model, windows)
        line = f"{name}: params {n_params(model):,}  loss {loss:.4f}  ppl {ppl:.2f}"
        if speed:
            line += f"  {speed[name]:.0f} tok/s (x{speed[name] / speed[ref]:.2f} vs {Path(ref).name})"
        print(line)
    for name, model in models.items() if tasks else ():
        for task, metrics in run_lm_eval(model, tok, tasks, args.lm_eval_limit, args.lm_eval_batch_size).items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            print(f"{name}: lm-eval {task}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
