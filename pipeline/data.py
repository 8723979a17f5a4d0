"""Training and evaluation text: load with ``datasets``, tokenize, pack into fixed windows.

Global batch ``b`` is a fixed set of packed windows whatever the launch shape: rank ``r``'s
micro-batch ``m`` takes windows ``[b*G + (m*world + r)*mbs, ... + mbs)`` of the epoch's seeded
permutation, ``G = mbs * grad_accum * world``. So 2 ranks x 1 micro-batch and 1 rank x 2 micro-
batches see the same global batch (the score-equivalence test relies on this), and ranks never
see the same window within an epoch.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from .config import InputError


class DataError(InputError):
    pass


def load_texts(path: str, text_field: str, key: str) -> datasets.Dataset:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{key}={path}: file not found")
    if p.stat().st_size == 0:
        raise DataError(f"{key}={path}: file is empty")
    datasets.disable_progress_bars()
    try:
        if p.suffix in (".jsonl", ".json"):
            ds = datasets.load_dataset("json", data_files=str(p), split="train")
            if text_field not in ds.column_names:
                raise DataError(
                    f"{key}={path}: records have no field {text_field!r} (fields: {ds.column_names}); "
                    "set data.text_field"
                )
            return (
                ds.select_columns([text_field]).rename_column(text_field, "text")
                if text_field != "text"
                else ds.select_columns(["text"])
            )
        # One row per file keeps newlines, which matter for code and manuals.
        return datasets.load_dataset("text", data_files=str(p), split="train", sample_by="document")
    except UnicodeDecodeError as e:
        raise DataError(f"{key}={path}: not valid UTF-8 ({e}); convert the file to UTF-8") from e
    except (datasets.exceptions.DatasetGenerationError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        cause = e.__cause__ or e
        if isinstance(cause, UnicodeDecodeError):
            raise DataError(f"{key}={path}: not valid UTF-8; convert the file to UTF-8") from e
        raise DataError(f"{key}={path}: cannot be read as {'jsonl' if p.suffix != '.txt' else 'text'}: {cause}") from e


def tokenize_to_blocks(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, seq_len: int, key: str, path: str, max_tokens: int = 0
) -> torch.Tensor:
    """All documents, each followed by EOS, concatenated and cut into [n, seq_len] windows."""
    eos = tokenizer.eos_token_id

    def tok(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [[*x, eos] if eos is not None else x for x in ids]}

    toks = ds.map(tok, batched=True, remove_columns=ds.column_names)
    flat = np.concatenate([np.asarray(x, dtype=np.int64) for x in toks["ids"]]) if len(toks) else np.zeros(0)
    if max_tokens:
        flat = flat[:max_tokens]
    n = len(flat) // seq_len
    if n == 0:
        raise DataError(f"{key}={path}: {len(flat)} tokens, fewer than one sequence of data.seq_len={seq_len}")
    return torch.from_numpy(flat[: n * seq_len].copy()).view(n, seq_len)


class TrainBatches:
    def __init__(self, blocks: torch.Tensor, micro_batch: int, grad_accum: int, world: int, rank: int, seed: int):
        self.blocks = blocks
        self.mbs, self.gas, self.world, self.rank, self.seed = micro_batch, grad_accum, world, rank, seed
        self._perms: dict[int, torch.Tensor] = {}

    @property
    def global_batch(self) -> int:
        return self.mbs * self.gas * self.world

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.blocks), generator=g)}
        return self._perms[epoch]

    def micro_batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        """Windows for 1-based optimizer ``step`` and micro-batch ``micro`` on this rank."""
        start = (step - 1) * self.global_batch + (micro * self.world + self.rank) * self.mbs
        idx = []
        for g in range(start, start + self.mbs):
            epoch, pos = divmod(g, len(self.blocks))
            idx.append(int(self._perm(epoch)[pos]))
        x = self.blocks[idx]
        return {"input_ids": x, "labels": x}


def eval_batches(blocks: torch.Tensor, micro_batch: int, world: int, rank: int) -> list[tuple[torch.Tensor, bool]]:
    """This rank's eval windows; every rank gets the same number of batches (ZeRO-3 forwards are
    collective), padded with repeats flagged ``False`` so they are not counted."""
    mine = blocks[rank::world]
    n_batches = -(-((len(blocks) + world - 1) // world) // micro_batch)
    out = []
    for b in range(n_batches):
        x = mine[b * micro_batch : (b + 1) * micro_batch]
        real = len(x) > 0
        if not real:
            x = blocks[:1]
        out.append((x, real))
    return out
