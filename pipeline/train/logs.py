"""Rank-0 logging: scalars to TensorBoard and/or Weights & Biases, a progress bar, and plain messages."""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline.config.schema import LoggingConfig
from pipeline.dist import comm as D

WANDB_ID = "wandb_run_id"  # in output.dir: a resumed run continues the same W&B run
TRAIN_LOG = "train_log.jsonl"  # rank 0: one row per logged step (loss, lr, sparsity)


def info(msg: str) -> None:
    if D.is_main():
        print(f"[prune] {msg}", file=sys.stderr, flush=True)


def finite_json(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None: JSON has no NaN (``json.dumps`` writes a bare ``NaN``
    that strict parsers such as JavaScript's ``JSON.parse`` reject)."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def dumps(obj: Any, indent: int | None = None) -> str:
    """Strict JSON (non-finite numbers as null) for every JSON file the pipeline writes."""
    return json.dumps(finite_json(obj), indent=indent, allow_nan=False)


def log_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of train_log.jsonl. A torn last line (the process killed mid-write) is dropped with a
    warning; an unreadable line before the last is a corrupt log, refused naming the line."""
    from pipeline.train.checkpoint import CheckpointError  # checkpoint imports this module

    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as e:
            if i == len(lines):
                info(f"warning: {path}: dropping its torn last line {i} ({line[:60]!r}); its writer was killed")
                continue
            raise CheckpointError(
                f"{path}:{i}: not a JSON row ({e}); repair or delete the line (the log is for reading only)"
            ) from None
    return rows


class TrainLog:
    """train_log.jsonl in the run directory (rank 0): emptied by a fresh run, cut back to the resumed step
    by a resumed one (a killed run may have logged past its last checkpoint), one flushed row per append."""

    def __init__(self, run_dir: Path, start: int) -> None:
        self.path = run_dir / TRAIN_LOG
        if start == 0:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            rows = log_rows(self.path)
            self.path.write_text("".join(dumps(r) + "\n" for r in rows if r["step"] <= start))

    def append(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as f:  # closed per row: a kill loses at most the row being written
            f.write(dumps(row) + "\n")

    def move(self, run_dir: Path) -> None:
        self.path = run_dir / TRAIN_LOG


def peak_memory_mb() -> float:
    """Peak accelerator memory on GPU; peak resident set of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def width_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[int]]]:
    """The per-layer kept-width table of a run summary: columns and one row per layer."""
    s = summary["structure"]
    cols = ["layer", "query heads", "of", "KV heads", "of", "MLP channels", "of"]
    rows = [
        [i, h, s["num_attention_heads"], kv, s["num_key_value_heads"], c, s["intermediate_size"]]
        for i, (h, kv, c) in enumerate(
            zip(
                summary["kept_heads_per_layer"],
                summary["kept_kv_heads_per_layer"],
                summary["kept_channels_per_layer"],
                strict=True,
            )
        )
    ]
    return cols, rows


def _flat_numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float | str]:
    """Scalars of a nested summary as "a/b" keys (lists, None and NaN left out: the tables and
    summary.json carry those)."""
    out: dict[str, float | str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_numbers(v, f"{prefix}{k}/"))
        elif isinstance(v, (bool, int, str)) or (isinstance(v, float) and math.isfinite(v)):
            out[f"{prefix}{k}"] = v
    return out


class _TensorBoard:
    def __init__(self, out_dir: Path) -> None:
        self.open(out_dir)

    def open(self, out_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(out_dir / "tb"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def final(self, step: int, summary: dict[str, Any], widths_png: Path | None) -> None:
        cols, rows = width_rows(summary)
        table = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
        table += "".join("| " + " | ".join(map(str, r)) + " |\n" for r in rows)
        self.writer.add_text("kept_widths", table, step)
        self.writer.add_text("summary", "```\n" + json.dumps(summary, indent=1) + "\n```", step)

    def close(self, ok: bool) -> None:
        self.writer.flush()
        self.writer.close()


class _WandB:
    """One W&B run per output.dir (its id is kept there, so a resumed run continues it). Without
    WANDB_MODE and without a W&B login, it logs offline into output.dir/wandb (`wandb sync` uploads)."""

    def __init__(self, out_dir: Path, lg: LoggingConfig, config: dict[str, Any], wandb_dir: Path | None = None) -> None:
        import wandb
        from wandb.errors import CommError, UsageError

        self.wandb = wandb
        id_file = out_dir / WANDB_ID
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        kwargs = dict(
            project=lg.project,
            name=lg.run_name or (wandb_dir or out_dir).resolve().name,
            dir=str(wandb_dir or out_dir),
            config=config,
            id=run_id,
            resume="allow",
        )
        try:
            self.run = wandb.init(**kwargs)
        except (UsageError, CommError) as e:
            if os.environ.get("WANDB_MODE"):
                raise
            info(f"wandb: {e}; logging offline to {(wandb_dir or out_dir) / 'wandb'} (upload later with `wandb sync`)")
            self.run = wandb.init(**kwargs, mode="offline")
        id_file.write_text(run_id + "\n")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        # W&B's JSON has no NaN for "no eval set": leave those out rather than log a string
        self.run.log({k: v for k, v in values.items() if not (isinstance(v, float) and math.isnan(v))}, step=step)

    def final(self, step: int, summary: dict[str, Any], widths_png: Path | None) -> None:
        cols, rows = width_rows(summary)
        extra: dict[str, Any] = {"kept_widths": self.wandb.Table(columns=cols, data=rows)}
        if widths_png is not None and widths_png.is_file():
            extra["kept_widths_plot"] = self.wandb.Image(str(widths_png))
        self.run.log(extra, step=step)
        # Input fingerprints are file hashes, for resume and compact, not run figures.
        self.run.summary.update(_flat_numbers({k: v for k, v in summary.items() if k != "fingerprints"}))

    def close(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


class RunLogger:
    """Every backend of ``logging.report_to`` on rank 0; the other ranks log nothing."""

    def __init__(
        self,
        out_dir: str | Path,
        total_steps: int,
        start: int = 0,
        lg: LoggingConfig | None = None,
        config: dict[str, Any] | None = None,
        wandb_dir: Path | None = None,
    ) -> None:
        """``wandb_dir``: where W&B keeps its files (default ``out_dir``); a run staged in output.dir/.incoming
        logs them to output.dir itself, since W&B keeps writing by path after the run directory moves."""
        lg = lg or LoggingConfig()
        self.backends: list[Any] = []
        self.bar = None
        self.train_log: TrainLog | None = None
        if D.is_main():
            out = Path(out_dir)
            self.train_log = TrainLog(out, start)
            if "tensorboard" in lg.report_to:
                self.backends.append(_TensorBoard(out))
            if "wandb" in lg.report_to:
                self.backends.append(_WandB(out, lg, config or {}, wandb_dir))
            self.bar = tqdm(total=total_steps, initial=start, desc="prune", dynamic_ncols=True)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for b in self.backends:
            b.scalars(step, values)

    def row(self, row: dict[str, Any]) -> None:
        """One row of train_log.jsonl (rank 0; a no-op elsewhere)."""
        if self.train_log is not None:
            self.train_log.append(row)

    def final(self, step: int, summary: dict[str, Any], widths_png: Path | None = None) -> None:
        """The run's summary and per-layer kept widths, once at the end."""
        for b in self.backends:
            b.final(step, summary, widths_png)

    def progress(self, postfix: dict[str, str]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    @contextlib.contextmanager
    def moving(self, new_dir: Path) -> Iterator[None]:
        """Around a move of the run directory: TensorBoard writes by path, so its event file is closed
        before and a new one opened in ``new_dir`` after (W&B keeps its own folder, which does not move)."""
        tbs = [b for b in self.backends if isinstance(b, _TensorBoard)]
        for b in tbs:
            b.close(True)
        try:
            yield
        finally:
            for b in tbs:
                b.open(new_dir)
            if self.train_log is not None:
                self.train_log.move(new_dir)

    def close(self, ok: bool = True) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        for b in self.backends:
            b.close(ok)
        self.backends = []
