"""Held-out perplexity of a plain (dense, masked or compact) model, the same way training evaluates;
wikitext-style strided perplexity of a whole text file; and the lm-evaluation-harness (optional
extra ``eval``)."""

from __future__ import annotations

import difflib
import importlib.util
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from pipeline.config.schema import LM_EVAL_MISSING, DataConfig, InputError
from pipeline.data.dataset import Windows, build_split, n_targets


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


def lm_eval_task_manager(tasks: list[str], include_path: str = "", key: str = "eval.lm_eval_tasks") -> Any:
    """Checks the task names before any model is loaded (indexing lm-eval's task YAMLs takes seconds);
    returns the TaskManager to run them with. ``include_path``: a folder of extra (local) task YAMLs."""
    if not lm_eval_available():
        raise InputError(f"{key}: {LM_EVAL_MISSING}")
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=include_path or None)
    known = set(tm.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        hints = [f"{t} (did you mean {', '.join(difflib.get_close_matches(t, known, n=2))}?)" for t in unknown]
        raise InputError(
            f"{key}: unknown lm-evaluation-harness task(s): {'; '.join(hints)}. `lm_eval ls tasks` lists them; "
            "a task of your own is a YAML file in a folder given as the include path"
        )
    return tm


def _metric_name(key: str) -> str:
    """lm-eval's "acc,none" -> "acc"; another filter stays in the name: "exact_match,strict-match" ->
    "exact_match/strict-match"."""
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}/{filt}"


def run_lm_eval(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    limit: float | None = None,
    batch_size: int = 8,
    task_manager: Any = None,
    num_fewshot: int | None = None,
) -> dict[str, dict[str, float]] | None:
    """lm-evaluation-harness tasks (e.g. hellaswag, arc_easy) on an already loaded model: per task, its
    numeric metrics (``acc``, ``acc_stderr``, ``acc_norm``, ...). Under ZeRO-3 every rank must call this:
    each one runs every request, since a forward is collective; lm-eval returns the results only in
    processes with LOCAL_RANK 0 (None elsewhere)."""
    tm = task_manager or lm_eval_task_manager(tasks, key="lm-eval tasks")
    import lm_eval  # optional dependency, imported only when asked for
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    limit = (int(limit) if limit >= 1 else limit) if limit else None  # lm-eval: a count or a fraction
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, limit=limit, task_manager=tm, num_fewshot=num_fewshot, log_samples=False
    )
    if results is None:  # lm-eval reports only where LOCAL_RANK is 0; D.broadcast_object shares rank 0's
        return None
    return {
        task: {_metric_name(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and "," in k}
        for task, metrics in results["results"].items()
    }


# Papers (SparseGPT, Wanda, LLM-Pruner, ...) report wikitext-2 perplexity over the whole test split,
# tokenized once and cut into non-overlapping windows of the model's context (2048 for LLaMA):
# stride = window. A stride below the window (Hugging Face's "perplexity of fixed-length models"
# guide uses 512) gives every scored token more context and a lower figure; it costs window/stride
# times the forwards.
STRIDED_WINDOW = 2048


@torch.inference_mode()
def strided_perplexity(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    path: str | Path,
    window: int = STRIDED_WINDOW,
    stride: int = 0,
    max_tokens: int = 0,
) -> tuple[float, float, int]:
    """(mean NLL per scored token, perplexity, tokens scored) of a whole text file, wikitext style.

    The file is read whole and tokenized once (with the tokenizer's BOS, as lm-eval and the papers do);
    windows of ``window`` tokens (capped at the model's ``max_position_embeddings``) start every
    ``stride`` tokens (0 = ``window``: non-overlapping), and each window scores only the tokens the
    previous one did not, with the rest of the window as context. ``max_tokens`` > 0 keeps the first N.
    """
    text = Path(path).read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if max_tokens:
        ids = ids[:max_tokens]
    context = getattr(model.config, "max_position_embeddings", None)
    window = min(window, context) if context else window
    stride = stride or window
    if not 1 <= stride <= window or window < 2:
        raise InputError(f"strided perplexity: need 1 <= stride ({stride}) <= window ({window}) and window >= 2")
    dev = next(model.parameters()).device
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        x = ids[begin:end][None].to(dev)
        labels = x.clone()
        labels[:, : x.shape[1] - (end - prev_end)] = -100  # context only: scored by an earlier window
        n = int((labels[:, 1:] != -100).sum())
        if n:
            nll += model(input_ids=x, labels=labels, use_cache=False).loss.item() * n
            count += n
        prev_end = end
        if end == len(ids):
            break
    if not count:
        raise InputError(f"{path}: fewer than 2 tokens; nothing to score")
    return nll / count, math.exp(nll / count), count
