"""Greedy generation and forward speed of exported models in vLLM (run with vLLM's Python).

python tools/vllm_generate.py --prompts PROMPTS.json --model COMPACT_DIR --out RESULT.json
    [--model DIR2 --out RESULT2.json ...] [--max-new-tokens 16] [--speed-tokens 0] [--dtype float32]

PROMPTS.json is a list of token-id lists. Each RESULT.json gets, per prompt, the greedy
continuation (``tokens``, EOS ignored) and the log-probability vLLM gave each of those tokens
(``logprobs``), and, with --speed-tokens N, ``forward_tokens_per_s``: prompt tokens per second of
one-token requests over about N prompt tokens (a forward pass over the prompts; median of 3
after a warm-up). --score adds ``prompt_logprobs``: per prompt, the log-probability of each of its
tokens given the ones before (None for the first), from vLLM's prompt_logprobs, which
tools/evaluate.py --engine vllm turns into perplexity; --gen-batch B adds
``generate_tokens_per_s``: greedy tokens per second of B requests of --max-new-tokens each
(median of 3 after a warm-up). Several models run one after another in one process (vLLM's
import is slow).

It imports vLLM and nothing from this repository, so it runs in vLLM's own environment (see the
README's "Serving" section); tests/test_vllm.py calls it to check vLLM against transformers.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any


def run_model(model: str, prompts: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=model,
        dtype=args.dtype,
        trust_remote_code=True,
        enforce_eager=True,
        max_model_len=args.max_model_len,
        seed=0,
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens, logprobs=0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy, use_tqdm=False)
    result: dict[str, Any] = {"generations": []}
    for o in outs:
        c = o.outputs[0]
        lps = [step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs, strict=True)]
        result["generations"].append({"tokens": list(c.token_ids), "logprobs": lps})
    if args.score:
        one = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        scored = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], one, use_tqdm=False)
        result["prompt_logprobs"] = [
            [None] + [step[tok].logprob for tok, step in zip(p[1:], o.prompt_logprobs[1:], strict=True)]
            for p, o in zip(prompts, scored, strict=True)
        ]
    if args.gen_batch:
        seconds = _timed(llm, _cycle(prompts, args.gen_batch), greedy)
        result["generate_tokens_per_s"] = args.gen_batch * args.max_new_tokens / seconds
    if args.speed_tokens:
        batch = _cycle(prompts, args.speed_tokens // max(len(p) for p in prompts))
        seconds = _timed(llm, batch, SamplingParams(temperature=0.0, max_tokens=1))
        result["speed_prompt_tokens"] = sum(len(b["prompt_token_ids"]) for b in batch)
        result["forward_tokens_per_s"] = result["speed_prompt_tokens"] / seconds
    del llm
    gc.collect()
    return result


def _cycle(prompts: list[list[int]], n: int) -> list[Any]:
    """n requests, going round the prompts."""
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=prompts[i % len(prompts)]) for i in range(n)]


def _timed(llm: Any, batch: list[Any], params: Any) -> float:
    """Median seconds of three generations of ``batch``, after a warm-up."""
    llm.generate(batch, params, use_tqdm=False)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        llm.generate(batch, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    ap.add_argument("--model", action="append", required=True, help="model directory (repeatable)")
    ap.add_argument("--out", action="append", required=True, help="result JSON, one per --model")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--speed-tokens", type=int, default=0, help="prompt tokens per timed forward (0: no timing)")
    ap.add_argument("--score", action="store_true", help="also each prompt token's log-probability")
    ap.add_argument("--gen-batch", type=int, default=0, help="requests per timed generation (0: no timing)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=None, help="default: the model's max_position_embeddings")
    args = ap.parse_args(argv)
    if len(args.model) != len(args.out):
        ap.error(f"{len(args.model)} --model but {len(args.out)} --out; give one --out per --model")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default reserves far more
    with open(args.prompts) as f:
        prompts = json.load(f)
    for model, out in zip(args.model, args.out, strict=True):
        result = run_model(model, prompts, args)
        with open(out, "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this module
    sys.exit(main())
