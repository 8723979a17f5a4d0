"""Held-out perplexity of a plain (dense, masked or compact) model, the same way training evaluates."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from .data import load_texts, tokenize_to_blocks


def eval_blocks(path: str, tokenizer: PreTrainedTokenizerBase, seq_len: int, max_tokens: int) -> torch.Tensor:
    """The windows ``data.eval`` gives in training: the first ``max_tokens`` tokens, cut every ``seq_len``."""
    return tokenize_to_blocks(load_texts(path, "text", "--text"), tokenizer, seq_len, "--text", path, max_tokens)


@torch.inference_mode()
def perplexity(model: nn.Module, blocks: torch.Tensor, batch: int = 8) -> tuple[float, float]:
    """(mean token NLL, perplexity) over non-overlapping windows; each window predicts seq_len - 1 tokens."""
    nll, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        x = blocks[i : i + batch]
        n = x.shape[0] * (x.shape[1] - 1)
        nll += model(input_ids=x, labels=x).loss.item() * n
        count += n
    return nll / count, math.exp(nll / count)
