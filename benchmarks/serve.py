"""Served models side by side: greedy tokens in vLLM against transformers, vLLM forward and generation speed.

python benchmarks/serve.py --text VALID.txt --model DENSE_DIR --model COMPACT_DIR [--model ...]
    [--prompts 8] [--prompt-tokens 32] [--new-tokens 16] [--speed-tokens 4096] [--gen-batch 8]
    [--vllm-python PATH] [--out DIR]

For every model: the real parameter count (zero padding excluded, from the export's model card; the
dense reference has none), the served one (every tensor in its safetensors), whether vLLM's greedy
continuations equal transformers' token for token (fp32 both, EOS ignored) with the largest log-prob
difference, and vLLM's forward tokens/s (one-token requests over --speed-tokens prompt tokens) and
greedy generation tokens/s (--gen-batch requests). All models run in one vLLM process one after another
(tools/vllm_generate.py, in vLLM's environment), so the speed ratios are side by side. Writes
DIR/serve.json and DIR/serve.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.export.compact import BaseWeights

ROOT = Path(__file__).resolve().parent.parent
VLLM_GENERATE = ROOT / "tools" / "vllm_generate.py"


def hf_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int) -> list[dict[str, Any]]:
    """transformers' greedy continuation of each prompt (EOS ignored, as vLLM's ``ignore_eos``) and its log-probs."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).eval()
    out = []
    for p in prompts:
        with torch.inference_mode():
            g = model.generate(
                torch.tensor([p]),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                output_logits=True,  # raw: the min_new_tokens processor masks EOS in the scores
                return_dict_in_generate=True,
            )
        tokens = g.sequences[0, len(p) :].tolist()
        lps = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(g.logits, tokens, strict=True)]
        out.append({"tokens": tokens, "logprobs": lps})
    return out


def vllm_run(vllm_python: str, models: list[Path], prompts: list[list[int]], args: argparse.Namespace, work: Path):
    (work / "prompts.json").write_text(json.dumps(prompts))
    cmd = [vllm_python, str(VLLM_GENERATE), "--prompts", str(work / "prompts.json")]
    for i, m in enumerate(models):
        cmd += ["--model", str(m), "--out", str(work / f"vllm-{i}.json")]
    cmd += ["--max-new-tokens", str(args.new_tokens), "--speed-tokens", str(args.speed_tokens)]
    cmd += ["--gen-batch", str(args.gen_batch)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env.pop("PYTHONPATH", None)  # vLLM's environment, not this one
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"vLLM failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads((work / f"vllm-{i}.json").read_text()) for i in range(len(models))]


def real_params(model_dir: Path, served: int) -> int:
    """Parameters without zero padding: the export's card states them; a model without that row has none."""
    card = model_dir / "README.md"
    m = (
        re.search(r"\| parameters before / real after \| [\d,]+ / ([\d,]+)", card.read_text())
        if card.is_file()
        else None
    )
    return int(m.group(1).replace(",", "")) if m else served


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", required=True, help="held-out plain text the prompts are cut from")
    ap.add_argument("--model", action="append", required=True, help="model directory; the first is the reference")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--speed-tokens", type=int, default=4096)
    ap.add_argument("--gen-batch", type=int, default=8)
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python")))
    ap.add_argument("--out", default="runs/serve")
    args = ap.parse_args(argv)
    models = [Path(m).resolve() for m in args.model]  # vLLM runs in a scratch directory
    tok = AutoTokenizer.from_pretrained(models[0])
    ids = tok(Path(args.text).read_text()[:2_000_000])["input_ids"]
    step = max(1, (len(ids) - args.prompt_tokens) // args.prompts)
    prompts = [ids[i * step : i * step + args.prompt_tokens] for i in range(args.prompts)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        served = vllm_run(args.vllm_python, models, prompts, args, Path(work))
    rows = []
    for m, v in zip(models, served, strict=True):
        ours = hf_greedy(m, prompts, args.new_tokens)
        same = sum(a["tokens"] == b["tokens"] for a, b in zip(ours, v["generations"], strict=True))
        pairs = zip(ours, v["generations"], strict=True)
        lp = max(abs(x - y) for a, b in pairs for x, y in zip(a["logprobs"], b["logprobs"], strict=False))
        n = BaseWeights(m).numel()
        rows.append(
            {
                "model": str(m),
                "real_params": real_params(m, n),
                "served_params": n,
                "architecture": json.loads((m / "config.json").read_text())["architectures"][0],
                "greedy_equal": f"{same}/{len(prompts)}",
                "max_logprob_diff": lp,
                "forward_tokens_per_s": v["forward_tokens_per_s"],
                "generate_tokens_per_s": v["generate_tokens_per_s"],
            }
        )
    ref = rows[0]
    lines = [
        "| model | architecture | real params | served params | vLLM greedy = transformers | max log-prob diff "
        "| vLLM forward tok/s | x dense | vLLM generate tok/s | x dense |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {Path(r['model']).name} | {r['architecture']} | {r['real_params']:,} | {r['served_params']:,} "
            f"| {r['greedy_equal']} | {r['max_logprob_diff']:.1e} | {r['forward_tokens_per_s']:.0f} "
            f"| {r['forward_tokens_per_s'] / ref['forward_tokens_per_s']:.2f} | {r['generate_tokens_per_s']:.0f} "
            f"| {r['generate_tokens_per_s'] / ref['generate_tokens_per_s']:.2f} |"
        )
    (out / "serve.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
