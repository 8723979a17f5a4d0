"""Rank-0 logging: TensorBoard scalars, a progress bar, and plain messages."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed as D


def info(msg: str) -> None:
    if D.is_main():
        print(f"[prune] {msg}", file=sys.stderr, flush=True)


def peak_memory_mb() -> float:
    """Peak accelerator memory on GPU; peak resident set of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RunLogger:
    def __init__(self, out_dir: str | Path, total_steps: int, start: int = 0) -> None:
        self.writer = None
        self.bar = None
        if D.is_main():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(out_dir) / "tb"))
            self.bar = tqdm(total=total_steps, initial=start, desc="prune", dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def progress(self, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
