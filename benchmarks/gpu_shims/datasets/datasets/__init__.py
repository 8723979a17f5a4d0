"""A stand-in for the few ``datasets`` calls that pipeline/data/dataset.py makes on a plain text file.

Used by benchmarks/gpu_check.sh only where the real package is missing (see ../../README.md): a text
file is one record ``{"text": <the whole file>}``, ``map`` runs batched in this process, and the arrow
view of the result offers the list-column methods the pipeline reads (``combine_chunks``,
``value_lengths``, ``flatten``, ``to_numpy``). Any other file kind raises an error naming this stand-in.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from . import exceptions

__all__ = ["Dataset", "DatasetDict", "disable_progress_bars", "exceptions", "load_dataset", "load_from_disk"]

SHIM = True  # lets a caller tell this stand-in from the real package
_BATCH = 1000  # datasets' default map batch size


def disable_progress_bars() -> None:
    pass


class _Values:
    """A flat column (what ``ListArray.flatten()`` or ``value_lengths()`` returns)."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def to_numpy(self, zero_copy_only: bool = True) -> np.ndarray:
        return self.values


class _ListColumn:
    """A column of integer lists (the arrow ListArray of a tokenized column, already combined)."""

    def __init__(self, rows: list[list[int]]) -> None:
        self.rows = rows

    def combine_chunks(self) -> _ListColumn:
        return self

    def value_lengths(self) -> _Values:
        return _Values(np.array([len(r) for r in self.rows], dtype=np.int64))

    def flatten(self) -> _Values:
        flat = [x for r in self.rows for x in r]
        return _Values(np.array(flat, dtype=np.int64))


class _Table:
    def __init__(self, columns: dict[str, list[Any]]) -> None:
        self.columns = columns

    def column(self, name: str) -> _ListColumn:
        return _ListColumn(self.columns[name])


class _ArrowView:
    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __getitem__(self, key: slice) -> _Table:
        return _Table({k: v[key] for k, v in self.ds.data.items()})


class Dataset:
    def __init__(self, data: dict[str, list[Any]]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(next(iter(self.data.values()), []))

    @property
    def column_names(self) -> list[str]:
        return list(self.data)

    def __getitem__(self, key: str | int) -> Any:
        if isinstance(key, str):
            return self.data[key]
        return {k: v[key] for k, v in self.data.items()}

    def map(
        self,
        function: Callable[..., dict[str, list[Any]]],
        batched: bool = False,
        with_indices: bool = False,
        remove_columns: list[str] | None = None,
        batch_size: int = _BATCH,
        **_ignored: Any,  # num_proc, keep_in_memory, load_from_cache_file, desc: one process, in memory
    ) -> Dataset:
        if not batched:
            raise NotImplementedError("datasets stand-in (benchmarks/gpu_shims): only batched map")
        n = len(self)
        out: dict[str, list[Any]] = {}
        for start in range(0, n, batch_size):
            idx = list(range(start, min(start + batch_size, n)))
            batch = {k: v[start : idx[-1] + 1] for k, v in self.data.items()}
            result = function(batch, idx) if with_indices else function(batch)
            for k, v in result.items():
                out.setdefault(k, []).extend(v)
        kept = {k: v for k, v in self.data.items() if k not in (remove_columns or []) and k not in out}
        return Dataset({**kept, **out})

    def with_format(self, kind: str) -> _ArrowView:
        if kind != "arrow":
            raise NotImplementedError(f"datasets stand-in (benchmarks/gpu_shims): with_format({kind!r})")
        return _ArrowView(self)

    def select_columns(self, names: list[str]) -> Dataset:
        return Dataset({k: self.data[k] for k in names})

    def rename_column(self, old: str, new: str) -> Dataset:
        return Dataset({(new if k == old else k): v for k, v in self.data.items()})


class DatasetDict(dict):
    pass


def load_dataset(kind: str, data_files: str, split: str = "train", sample_by: str = "line", **_: Any) -> Dataset:
    if kind != "text" or sample_by != "document":
        raise ValueError(
            f"the datasets stand-in (benchmarks/gpu_shims) reads plain text files only, not {kind!r} "
            f"(sample_by={sample_by!r}); install datasets"
        )
    return Dataset({"text": [Path(data_files).read_text(encoding="utf-8")]})


def load_from_disk(path: str) -> Dataset:
    raise ValueError(f"{path}: the datasets stand-in (benchmarks/gpu_shims) cannot read save_to_disk folders")
