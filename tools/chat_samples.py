"""Greedy answers of several models to the same chat prompts, side by side (markdown).

    python tools/chat_samples.py --model models/smollm2-135m --model runs/smol/compact-0.2 \
        --prompt "What does :wq do in Vim?" --prompt "Name three primary colors." [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "How do I save a file and quit in Vim?",
    "Give me one tip for writing clear emails.",
    "What does the Vim command dd do?",
    "Name three primary colors.",
)


def answer(model, tok, prompt: str, max_new_tokens: int) -> str:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="model directory (repeat)")
    ap.add_argument("--prompt", action="append", help="a user message (repeat; default: five built-in prompts)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    a = ap.parse_args(argv)
    prompts = a.prompt or list(DEFAULT_PROMPTS)
    answers = []
    for path in a.model:
        tok = AutoTokenizer.from_pretrained(path)
        if not tok.chat_template:
            print(f"error: {path} has no chat template", file=sys.stderr)
            return 2
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=True).eval()
        answers.append([answer(model, tok, p, a.max_new_tokens) for p in prompts])
    cell = lambda s: s.replace("|", "\\|").replace("\n", " ")  # noqa: E731
    print("| prompt | " + " | ".join(f"`{m}`" for m in a.model) + " |")
    print("|---" * (len(a.model) + 1) + "|")
    for i, p in enumerate(prompts):
        print(f"| {cell(p)} | " + " | ".join(cell(ans[i]) for ans in answers) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
