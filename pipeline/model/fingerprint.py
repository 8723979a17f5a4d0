"""Fingerprints of a run's inputs (the base model directory and each data source), so that a resume or
an export notices a file replaced at the same path.

A file's fingerprint is its size and a SHA-256: of the whole file up to ``FULL_HASH_BYTES``; above that,
of ``SAMPLES`` evenly spaced 64 KiB pieces plus, for safetensors, the whole header (names, dtypes,
shapes, offsets). Other weights (fine-tuned, re-initialised, another model of the same shape) differ
in every piece, so they are caught; a change confined to bytes between the pieces of a large file
is not. Cost: at most a few MiB read per file.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any

from pipeline.config.schema import DataConfig

FULL_HASH_BYTES = 64 * 2**20
SAMPLES = 32
PIECE = 64 * 2**10
_MODEL_FILES = ("config.json",)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def file_fingerprint(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as f:
        if size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
            return {"size": size, "sha256": h.hexdigest()}
        if path.suffix == ".safetensors":
            (n,) = struct.unpack("<Q", f.read(8))
            h.update(f.read(min(n, size - 8)))
        for i in range(SAMPLES):
            f.seek((size - PIECE) * i // (SAMPLES - 1))
            h.update(f.read(PIECE))
    return {"size": size, "sampled_sha256": h.hexdigest()}


def model_fingerprint(model_dir: Path) -> dict[str, Any]:
    """config.json and every weight file of a model directory, by name."""
    model_dir = Path(model_dir)
    files = [model_dir / n for n in _MODEL_FILES if (model_dir / n).is_file()]
    files += sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files.append(index)
    return {p.name: file_fingerprint(p) for p in files}


def data_fingerprint(data: DataConfig) -> dict[str, Any]:
    """Every training and eval source: its path and the fingerprint of each of its files."""
    out: dict[str, Any] = {}
    for src in data.sources("train") + data.sources("eval"):
        p = Path(src.path)
        if p.is_dir():
            files = {str(f.relative_to(p)): file_fingerprint(f) for f in sorted(p.rglob("*")) if f.is_file()}
        elif p.is_file():
            files = {p.name: file_fingerprint(p)}
        else:
            files = {}
        out[src.key] = {"path": src.path, "files": files}
    return out


def run_fingerprints(model_dir: Path, data: DataConfig) -> dict[str, Any]:
    return {"base": model_fingerprint(model_dir), "data": data_fingerprint(data)}


def _describe(old: dict[str, Any], new: dict[str, Any], where: str) -> list[str]:
    changes = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        if a is None:
            changes.append(f"{where}{name} is new")
        elif b is None:
            changes.append(f"{where}{name} is gone")
        elif a.get("size") != b.get("size"):
            changes.append(f"{where}{name}: {a.get('size')} bytes, now {b.get('size')}")
        else:
            changes.append(f"{where}{name}: same size, different content")
    return changes


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two ``run_fingerprints`` records, one phrase per file."""
    changes = [f"base model {c}" for c in _describe(old.get("base", {}), new.get("base", {}), "")]
    od, nd = old.get("data", {}), new.get("data", {})
    for key in sorted(set(od) | set(nd)):
        a, b = od.get(key, {}), nd.get(key, {})
        where = f"{key} ({b.get('path') or a.get('path')}): "
        changes += _describe(a.get("files", {}), b.get("files", {}), where)
    return changes
