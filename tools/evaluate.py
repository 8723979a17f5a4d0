"""Perplexity and forward speed of models side by side, on the same held-out windows.

python tools/evaluate.py --text ../shared/data/vimdoc/valid.txt --model DENSE_DIR --model COMPACT_DIR
    [--seq-len 256] [--max-tokens 40000] [--speed-batch 8] [--repeats 15] [--threads N]

The first --model is the reference for the speed ratio. Tokenized with the first model's tokenizer.
Models with their own modeling code (per-layer widths) load with trust_remote_code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, not sibling files
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.evaluation import eval_blocks, perplexity
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
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model[0])
    blocks = eval_blocks(args.text, tok, args.seq_len, args.max_tokens)
    print(f"{args.text}: {blocks.numel()} tokens, {len(blocks)} windows of {args.seq_len}")
    models = {m: AutoModelForCausalLM.from_pretrained(m, trust_remote_code=True).eval() for m in args.model}
    speed = forward_speed(models, blocks[: args.speed_batch], repeats=args.repeats) if args.speed_batch else {}
    ref = args.model[0]
    for name, model in models.items():
        loss, ppl = perplexity(model, blocks)
        line = f"{name}: params {n_params(model):,}  loss {loss:.4f}  ppl {ppl:.2f}"
        if speed:
            line += f"  {speed[name]:.0f} tok/s (x{speed[name] / speed[ref]:.2f} vs {Path(ref).name})"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
