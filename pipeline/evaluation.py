"""Held-out perplexity of a plain (dense, masked or compact) model, the same way training evaluates,
and an optional hook into the lm-evaluation-harness."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .config import DataConfig, InputError
from .data import Windows, build_split, n_targets

LM_EVAL_MISSING = (
    "the lm-evaluation-harness is not installed: pip install 'lm_eval[hf]' (its tasks download their "
    "data sets from the Hugging Face Hub on first use)"
)


def eval_windows(
    path: str,
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    max_tokens: int,
    fmt: str = "auto",
    text_field: str = "text",
    packing: bool = True,
) -> Windows:
    """The windows ``data.eval`` gives in training (format, prompt masking, packing, first
    ``max_tokens`` tokens cut every ``seq_len``)."""
    cfg = DataConfig(
        eval=path, format=fmt, text_field=text_field, seq_len=seq_len, eval_max_tokens=max_tokens, packing=packing
    )
    return build_split(cfg, "eval", tokenizer)


@torch.inference_mode()
def perplexity(model: nn.Module, blocks: Windows | torch.Tensor, batch: int = 8) -> tuple[float, float]:
    """(mean NLL per target token, perplexity); a plain [n, seq_len] tensor predicts seq_len - 1 tokens per window."""
    w = Windows.of(blocks)
    nll, count = 0.0, 0
    for i in range(0, len(w), batch):
        b = w.batch(slice(i, i + batch))
        n = n_targets(b["labels"])
        if n:
            # No KV cache: with one, transformers ignores the packed documents' position_ids in the mask.
            nll += model(**b, use_cache=False).loss.item() * n
            count += n
    return nll / count, math.exp(nll / count)


def lm_eval_available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def run_lm_eval(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    limit: float | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, Any]]:
    """lm-evaluation-harness tasks (e.g. hellaswag, arc_easy) on an already loaded model: per task, its metrics."""
    if not lm_eval_available():
        raise InputError(LM_EVAL_MISSING)
    import lm_eval  # optional dependency, imported only when asked for
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit)
    return results["results"]
