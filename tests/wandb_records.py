"""Reads the records of an offline W&B run (``run-ID.wandb``) for the tests.

The file is W&B's transaction log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then 32 KiB
blocks of chunks, each with a 7-byte header (CRC-32, length, type: 1 full, 2 first, 3 middle, 4 last)
and a piece of a serialized ``wandb_internal_pb2.Record``. wandb ships no reader of its own.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768


def _chunks(data: bytes) -> list[bytes]:
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), "not a W&B transaction log"
    out, buf, pos = [], b"", 7
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # the rest of a block too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            pos += left
            continue
        piece = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            out.append(piece)
        elif kind == 2:
            buf = piece
        elif kind == 3:
            buf += piece
        elif kind == 4:
            out.append(buf + piece)
    return out


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(run_dir: Path) -> dict[str, Any]:
    """{"config": {...}, "history": [{key: value}, ...], "summary": {...}, "name", "project"} of an
    offline run directory (``.../wandb/offline-run-*``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = run_dir.glob("run-*.wandb")
    out: dict[str, Any] = {"config": {}, "history": [], "summary": {}}
    for raw in _chunks(log.read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["name"], out["project"], out["id"] = rec.run.display_name, rec.run.project, rec.run.run_id
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({_key(i): json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({_key(i): json.loads(i.value_json) for i in rec.summary.update})
    return out
