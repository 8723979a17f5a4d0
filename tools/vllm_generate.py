"""Greedy generation and forward speed of an exported model in vLLM (run with vLLM's Python).

python tools/vllm_generate.py --model COMPACT_DIR --prompts PROMPTS.json --out RESULT.json
    [--max-new-tokens 16] [--speed-tokens 0] [--dtype float32]

PROMPTS.json is a list of token-id lists. RESULT.json gets, per prompt, the greedy continuation
(``tokens``) and the log-probability vLLM gave each of those tokens (``logprobs``), and, with
--speed-tokens N, ``forward_tokens_per_s``: prompt tokens per second of one-token requests over
about N prompt tokens (a forward pass over the prompts; median of 3 after a warm-up).

It imports vLLM and nothing from this repository, so it runs in vLLM's own environment (see the
README's "Serving" section); tests/test_vllm.py calls it to check vLLM against transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--speed-tokens", type=int, default=0, help="prompt tokens per timed forward (0: no timing)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=512)
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default reserves far more

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(args.prompts) as f:
        prompts = json.load(f)
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        trust_remote_code=True,
        enforce_eager=True,
        max_model_len=args.max_model_len,
        seed=0,
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_new_tokens, logprobs=0, ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], greedy, use_tqdm=False)
    result: dict = {"generations": []}
    for o in outs:
        c = o.outputs[0]
        lps = [step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs, strict=True)]
        result["generations"].append({"tokens": list(c.token_ids), "logprobs": lps})
    if args.speed_tokens:
        seq = max(len(p) for p in prompts)
        batch = [TokensPrompt(prompt_token_ids=prompts[i % len(prompts)]) for i in range(args.speed_tokens // seq)]
        one = SamplingParams(temperature=0.0, max_tokens=1)
        n_tokens = sum(len(b["prompt_token_ids"]) for b in batch)
        llm.generate(batch, one, use_tqdm=False)  # warm-up
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            llm.generate(batch, one, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        result["forward_tokens_per_s"] = n_tokens / statistics.median(times)
        result["speed_prompt_tokens"] = n_tokens
    with open(args.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this module
    sys.exit(main())
