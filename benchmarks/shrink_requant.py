"""Issue 14: what re-quantizing the column-sliced projections (o_proj, down_proj) after a shrink costs.

The model is the NF4 round trip of a base (what an NF4 run trains against). Masks keep 50% of KV groups and
of MLP channels (blocks of 64) per layer, at random (fixed seed). Three forwards on the held-out text:
masked (the reference), cut with o/down re-quantized on their new block boundaries, and cut with o/down kept
dense (exact). Reports relative weight error, held-out perplexity, and the bytes of o/down each way.

  python -m benchmarks.shrink_requant --model ../shared/models/vimdoc-llama-7m --text ../shared/data/vimdoc/valid.txt
"""

from __future__ import annotations

import argparse
import math

import bitsandbytes as bnb
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.model.loading import NF4_BLOCKSIZE, nf4_roundtrip
from pipeline.model.structure import decoder_layers, layer_modules, structure_from_config
from pipeline.train.shrink import layer_keep, slice_nf4_cols


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, window: int) -> float:
    nll, n = 0.0, 0
    for i in range(0, len(ids) - window, window):
        x = ids[i : i + window][None]
        nll += model(input_ids=x, labels=x).loss.item() * (window - 1)
        n += window - 1
    return math.exp(nll / n)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--tokens", type=int, default=40000)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(a.model)
    with open(a.text) as f:
        ids = torch.tensor(tok(f.read())["input_ids"][: a.tokens])
    s = structure_from_config(model.config)
    results: dict[str, list[float]] = {"requantize": []}
    nf4_bytes = dense_bytes = 0
    originals = {}
    for layer in decoder_layers(model):
        mods = layer_modules(layer)
        for m in mods.values():
            m.weight.copy_(nf4_roundtrip(m.weight, torch.float32, True))
        groups = torch.randperm(s.num_kv_heads)[: s.num_kv_heads // 2]
        heads = torch.zeros(s.num_kv_heads)
        heads[groups] = 1
        heads = heads.repeat_interleave(s.heads_per_group)
        blocks = s.intermediate_size // 64
        ch = torch.zeros(blocks)
        ch[torch.randperm(blocks)[: blocks // 2]] = 1
        keep = layer_keep(heads, ch.repeat_interleave(64), s.heads_per_group, s.head_dim)
        for name in ("o_proj", "down_proj"):
            w = mods[name].weight
            idx = keep.rows(name)
            keep_cols = torch.zeros(w.shape[1])
            keep_cols[idx] = 1
            w.mul_(keep_cols)  # masked == cut with exact weights
            packed, state = bnb.functional.quantize_4bit(w, blocksize=NF4_BLOCKSIZE, compress_statistics=True)
            dense, _ = slice_nf4_cols(packed, state, idx, "dense")
            q, qs = slice_nf4_cols(packed, state, idx, "requantize")
            rq = bnb.functional.dequantize_4bit(q, qs)
            results["requantize"].append(((rq - dense).norm() / dense.norm()).item())
            nf4_bytes += q.numel() * q.element_size() + qs.absmax.numel()
            dense_bytes += dense.numel() * 2  # bf16 compute dtype
            originals[name, len(originals)] = (w, idx, rq)
    masked = perplexity(model, ids, a.window)
    for w, idx, rq in originals.values():
        w[:, idx] = rq
    requant = perplexity(model, ids, a.window)
    errs = results["requantize"]
    print(f"o/down relative weight error after re-quantization: mean {sum(errs) / len(errs):.4f} max {max(errs):.4f}")
    change = 100 * (requant / masked - 1)
    print(f"held-out ppl: masked (= cut, dense o/down) {masked:.4f}  cut, re-quantized {requant:.4f} ({change:+.3f}%)")
    print(f"o/down bytes after the cut: NF4 {nf4_bytes}  bf16 dense {dense_bytes}  ({dense_bytes / nf4_bytes:.2f}x)")


if __name__ == "__main__":
    main()
