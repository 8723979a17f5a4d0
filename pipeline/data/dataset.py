"""Training and evaluation data: load with ``datasets``, tokenize, mask prompts, pack or pad, cache.

Sources are ``data.train`` plus the ``data.mix`` entries (each with its own format and weight), and
``data.eval``. A source is a plain text file (one document), a record file ``datasets`` reads
(.jsonl/.json/.csv/.tsv/.parquet/.arrow) or a ``save_to_disk`` directory. Each record becomes text
segments marked as prompt or target, tokenized separately so that labels are -100 exactly on the
prompt tokens (chat: the prompt boundary comes from rendering each prefix of the conversation with
the tokenizer's chat template). Text and plain alpaca documents end with EOS; templated ones with
the template's own end-of-turn markup.

Packed (``data.packing``) documents are concatenated and cut into ``seq_len`` windows; position_ids
restart at 0 at every document start and window start, which transformers (5.x, eager/sdpa/flash)
turns into a block-diagonal mask when no attention_mask is passed and no KV cache is built, so
documents do not attend to each other (the forward needs ``use_cache=False`` for that). The first
token of a document is never a target (it would be predicted from the previous document).
Unpacked, every example is its own row, padded with an attention mask.

Rank 0 tokenizes and writes each source's windows to ``data.cache_dir``, keyed by the tokenizer, the
file (path, size, mtime) and every setting that changes the windows; the other ranks wait, then read
the cache (or tokenize themselves when it is off or not on a shared file system).

Global batch ``b`` is a fixed set of windows whatever the launch shape: rank ``r``'s micro-batch
``m`` takes windows ``[b*G + (m*world + r)*mbs, ... + mbs)`` of the epoch's seeded permutation,
``G = mbs * grad_accum * world``. So 2 ranks x 1 micro-batch and 1 rank x 2 micro-batches see the
same global batch (the score-equivalence test relies on this), and ranks never see the same window
within an epoch.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from pipeline.config.schema import DataConfig, DataSource, InputError
from pipeline.dist import comm as D
from pipeline.train.logs import info

IGNORE = -100  # label of positions that carry no loss (transformers' ignore_index)
CACHE_VERSION = 1  # bump when the windows built from the same inputs change
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
_READERS = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
_TEXT_SUFFIXES = (".txt", ".md", ".text")


class DataError(InputError):
    pass


@dataclass
class Windows:
    """Rows of token ids with their labels; packed rows carry position_ids, padded rows an attention mask."""

    input_ids: torch.Tensor  # [n, seq_len]
    labels: torch.Tensor  # [n, seq_len], IGNORE where no loss
    position_ids: torch.Tensor | None = None  # packed: restart at 0 per document and per window
    attention_mask: torch.Tensor | None = None  # unpacked: 1 on tokens, 0 on padding

    @classmethod
    def of(cls, blocks: Windows | torch.Tensor) -> Windows:
        """Plain [n, seq_len] token windows: every position is a target, no document boundaries."""
        return blocks if isinstance(blocks, Windows) else cls(blocks, blocks)

    def __len__(self) -> int:
        return len(self.input_ids)

    def fields(self) -> dict[str, torch.Tensor]:
        out = {"input_ids": self.input_ids, "labels": self.labels}
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        return out

    def select(self, idx: Sequence[int] | torch.Tensor | slice) -> Windows:
        return Windows(**{k: v[idx] for k, v in self.fields().items()})

    def batch(self, idx: Sequence[int] | torch.Tensor | slice) -> dict[str, torch.Tensor]:
        """Model inputs for rows ``idx`` (int64); padded rows are cut to the longest row of the batch."""
        rows = {k: v[idx].long() for k, v in self.fields().items()}
        if "attention_mask" in rows:
            width = max(int(rows["attention_mask"].sum(1).max()), 1)
            rows = {k: v[:, :width] for k, v in rows.items()}
        return rows

    @classmethod
    def cat(cls, parts: Sequence[Windows]) -> Windows:
        return cls(**{k: torch.cat([p.fields()[k] for p in parts]) for k in parts[0].fields()})


def n_targets(labels: torch.Tensor) -> int:
    """Tokens the causal-LM loss averages over: labels shifted by one, IGNORE excluded."""
    return int((labels[:, 1:] != IGNORE).sum())


# ---------------------------------------------------------------------------------------------
# Reading files


def _read(path: str, key: str) -> tuple[datasets.Dataset, bool]:
    """The records of a file or save_to_disk directory, and whether it is plain text (one document)."""
    p = Path(path)
    datasets.disable_progress_bars()
    if p.is_dir():
        if not any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            raise DataError(f"{key}={path}: a directory, but not one written by datasets' save_to_disk")
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            raise DataError(
                f"{key}={path}: holds several splits ({', '.join(ds)}); point {key} at one of them, "
                f"e.g. {p / next(iter(ds))}"
            )
        return _nonempty(ds, key, path), False
    if not p.is_file():
        raise DataError(f"{key}={path}: file not found")
    if p.stat().st_size == 0:
        raise DataError(f"{key}={path}: file is empty")
    suffix = p.suffix.lower()
    text = suffix in _TEXT_SUFFIXES or not suffix  # a file without a suffix is read as plain text
    if not text and suffix not in _READERS:
        raise DataError(
            f"{key}={path}: unknown file type {suffix!r}; use plain text ({', '.join(_TEXT_SUFFIXES)}), "
            f"{', '.join(_READERS)}, or a save_to_disk directory"
        )
    _check_utf8(p, key)
    try:
        if text:  # one row per file keeps newlines, which matter for code and manuals
            ds = datasets.load_dataset("text", data_files=str(p), split="train", sample_by="document")
        else:
            kwargs = {"delimiter": "\t"} if suffix == ".tsv" else {}
            ds = datasets.load_dataset(_READERS[suffix], data_files=str(p), split="train", **kwargs)
    except (datasets.exceptions.DatasetGenerationError, ValueError) as e:
        cause = e.__cause__ or e
        kind = "text" if text else _READERS[suffix]
        bad = _bad_json_line(p) if suffix == ".jsonl" else None
        if bad:  # pyarrow counts rows from 0 and loses the file; the 1-based line is what an editor shows
            raise DataError(f"{key}={path}: {bad}; fix or remove that line") from None
        raise DataError(f"{key}={path}: cannot be read as {kind}: {cause}") from e
    return _nonempty(ds, key, path), text


def _bad_json_line(p: Path) -> str | None:
    """The first line of a JSON-lines file that is not one JSON object, as ``line N (1-based): why``."""
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                return f"line {n}: not valid JSON ({e.args[0] if e.args else e})"
            if not isinstance(obj, dict):
                return f"line {n}: a JSON {type(obj).__name__}, not an object of fields"
    return None


def _check_utf8(p: Path, key: str) -> None:
    """Readers decode lazily (pyarrow's JSON reader only when a string is read), so check up front:
    one streaming pass, and the error can name the line."""
    if p.suffix.lower() in (".parquet", ".arrow"):  # binary
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    lines = 0
    with open(p, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                line = lines + chunk.count(b"\n", 0, max(e.start, 0)) + 1
                raise DataError(
                    f"{key}={p}: not valid UTF-8 (line {line}: {e.reason}); convert the file to UTF-8"
                ) from e
            if not chunk:
                return
            lines += chunk.count(b"\n")


def _nonempty(ds: datasets.Dataset, key: str, path: str) -> datasets.Dataset:
    if len(ds) == 0:
        raise DataError(f"{key}={path}: no records")
    return ds


def _resolve_format(
    ds: datasets.Dataset, src: DataSource, plain: bool, tokenizer: PreTrainedTokenizerBase | None
) -> str:
    """``text``, ``alpaca`` or ``chat``, checked against the records' fields."""
    fmt, cols, where = src.format, ds.column_names, f"{src.key}={src.path}"
    if plain:
        if fmt in ("alpaca", "chat"):
            raise DataError(f"{where}: a plain text file has no records; give {fmt} data as .jsonl, .parquet, ...")
        return "text"
    if fmt == "auto":
        if src.text_field in cols:
            fmt = "text"
        elif "messages" in cols:
            fmt = "chat"
        elif {"instruction", "output"} <= set(cols):
            fmt = "alpaca"
        else:
            raise DataError(
                f"{where}: records have no field {src.text_field!r} (fields: {cols}); set data.text_field, "
                "or give instruction data as 'instruction'/'input'/'output' (alpaca) or 'messages' (chat)"
            )
    if fmt in ("text", "jsonl"):
        if src.text_field not in cols:
            raise DataError(f"{where}: records have no field {src.text_field!r} (fields: {cols}); set data.text_field")
        return "text"
    need = {"alpaca": ["instruction", "output"], "chat": ["messages"]}[fmt]
    missing = [f for f in need if f not in cols]
    if missing:
        raise DataError(f"{where}: format {fmt} needs field(s) {missing}; the records have {cols}")
    if fmt == "chat" and not (tokenizer is not None and tokenizer.chat_template):
        raise DataError(
            f"{where}: chat data needs a tokenizer with a chat_template, and this model's has none; "
            "add one to tokenizer_config.json or use alpaca records"
        )
    return fmt


# ---------------------------------------------------------------------------------------------
# Records -> (text, is_target) segments -> token ids and labels

Segments = list[tuple[str, bool]]


def _chat_segments(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], where: str) -> Segments:
    """The rendered conversation cut at assistant turns: each turn's text is a target, the rest
    (system/user turns, the generation prompt) is prompt. Found by rendering each prefix of the
    conversation with the tokenizer's own chat template."""

    def render(msgs: list[dict[str, Any]], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    unstable = DataError(
        f"{where}: the chat template renders earlier turns differently once later turns are added, so the "
        "prompt boundary cannot be found; use alpaca records or a template that only appends"
    )
    segs: Segments = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise unstable
        segs += [(prompt[len(done) :], False), (full[len(prompt) :], True)]
        done = full
    whole = render(messages, False)
    if not whole.startswith(done):
        raise unstable
    segs.append((whole[len(done) :], False))
    return [s for s in segs if s[0]]


def _check_str(value: Any, field: str, where: str, optional: bool = False) -> str:
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}: {value!r:.60}")
    return value


def _segmenter(
    fmt: str, src: DataSource, tokenizer: PreTrainedTokenizerBase
) -> Callable[[dict[str, Any], str], Segments]:
    """One record -> segments; ``where`` names the record in errors."""

    def text(row: dict[str, Any], where: str) -> Segments:
        return [(_check_str(row[src.text_field], src.text_field, where), True)]

    def chat(row: dict[str, Any], where: str) -> Segments:
        msgs = row["messages"]
        ok = isinstance(msgs, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        )
        if not ok or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} strings")
        return _chat_segments(tokenizer, [{"role": m["role"], "content": m["content"]} for m in msgs], where)

    def alpaca(row: dict[str, Any], where: str) -> Segments:
        instruction = _check_str(row["instruction"], "instruction", where)
        extra = _check_str(row.get("input"), "input", where, optional=True)
        output = _check_str(row["output"], "output", where)
        if tokenizer.chat_template:  # an instruction-tuned model: its own format
            user = f"{instruction}\n\n{extra}" if extra else instruction
            msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
            return _chat_segments(tokenizer, msgs, where)
        prompt = (ALPACA_PROMPT_INPUT if extra else ALPACA_PROMPT).format(instruction=instruction, input=extra)
        return [(prompt, False), (output, True)]

    return {"text": text, "chat": chat, "alpaca": alpaca}[fmt]


def _encode(
    ds: datasets.Dataset, fmt: str, src: DataSource, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every record tokenized (``datasets.map``, ``data.num_proc`` processes): flat ids, flat labels,
    and each document's length. Text and plain alpaca documents end with EOS (a target after a
    target segment); a chat template's own end-of-turn markup ends the others."""
    segment = _segmenter(fmt, src, tokenizer)
    templated = fmt == "chat" or (fmt == "alpaca" and bool(tokenizer.chat_template))
    eos = None if templated else tokenizer.eos_token_id
    train_on_prompt = cfg.train_on_prompt

    def tok(batch: dict[str, list[Any]], idx: list[int]) -> dict[str, list[list[int]]]:
        rows = [{k: batch[k][j] for k in batch} for j in range(len(idx))]
        segs = [segment(r, f"{src.key}={src.path}: record {i + 1}") for r, i in zip(rows, idx, strict=True)]
        flat = [s for doc in segs for s, _ in doc]
        ids_flat = iter(tokenizer(flat, add_special_tokens=False)["input_ids"]) if flat else iter(())
        out_ids, out_labels = [], []
        for doc in segs:
            ids: list[int] = []
            labels: list[int] = []
            for _, target in doc:
                piece = next(ids_flat)
                ids += piece
                labels += piece if target or train_on_prompt else [IGNORE] * len(piece)
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)
                labels.append(eos if (doc and doc[-1][1]) or train_on_prompt else IGNORE)
            out_ids.append(ids)
            out_labels.append(labels)
        return {"input_ids": out_ids, "labels": out_labels}

    # Process start-up costs more than it saves on small files.
    num_proc = max(1, min(cfg.num_proc, os.cpu_count() or 1, len(ds) // 1000))
    toks = ds.map(
        tok,
        batched=True,
        with_indices=True,
        remove_columns=ds.column_names,
        num_proc=num_proc if num_proc > 1 else None,
        keep_in_memory=True,  # our own cache below holds the result; no second copy in HF's cache
        load_from_cache_file=False,
        desc=f"tokenizing {src.path}",
    )
    table = toks.with_format("arrow")[:]
    ids_col = table.column("input_ids").combine_chunks()
    lengths = ids_col.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    ids = ids_col.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
    labels = table.column("labels").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.int32)
    return ids, labels, lengths


# ---------------------------------------------------------------------------------------------
# Token streams -> windows


def pack(ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray, seq_len: int) -> Windows:
    """Concatenated documents cut into ``seq_len`` windows (the tail shorter than one window is dropped)."""
    n = len(ids) // seq_len
    total = n * seq_len
    starts = np.zeros(len(ids), dtype=bool)
    starts[np.concatenate([[0], np.cumsum(lengths)[:-1]])] = True
    labels = labels.copy()
    labels[starts] = IGNORE  # a document's first token is not predicted from the previous document
    idx = np.arange(total)
    last_start = np.maximum.accumulate(np.where(starts[:total], idx, 0))
    pos = idx - np.maximum(last_start, idx - idx % seq_len)
    return Windows(
        torch.from_numpy(ids[:total].reshape(n, seq_len).copy()),
        torch.from_numpy(labels[:total].reshape(n, seq_len).copy()),
        position_ids=torch.from_numpy(pos.astype(np.int32).reshape(n, seq_len)),
    )


def pad(
    ids: np.ndarray,
    labels: np.ndarray,
    lengths: np.ndarray,
    seq_len: int,
    pad_id: int,
    truncate: bool,
    where: str,
    context: int | None = None,
) -> Windows:
    """One row per document, right-padded to ``seq_len``; longer documents are an error unless ``truncate``."""
    if not truncate and lengths.max() > seq_len:
        i = int(np.argmax(lengths > seq_len))
        limit = f"up to the model's context, max_position_embeddings={context}" if context else "if the model allows"
        raise DataError(
            f"{where}: record {i + 1} has {lengths[i]} tokens, longer than data.seq_len={seq_len}, and "
            f"data.packing=false keeps examples whole: raise data.seq_len ({limit}), set data.truncation=true "
            "to cut examples, or data.packing=true"
        )
    n = len(lengths)
    out_ids = np.full((n, seq_len), pad_id, dtype=np.int32)
    out_labels = np.full((n, seq_len), IGNORE, dtype=np.int32)
    mask = np.zeros((n, seq_len), dtype=np.int8)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for i in range(n):
        k = min(int(lengths[i]), seq_len)
        out_ids[i, :k] = ids[offsets[i] : offsets[i] + k]
        out_labels[i, :k] = labels[offsets[i] : offsets[i] + k]
        mask[i, :k] = 1
    return Windows(torch.from_numpy(out_ids), torch.from_numpy(out_labels), attention_mask=torch.from_numpy(mask))


def _with_targets(w: Windows) -> Windows:
    """Rows with at least one target: a row of prompt only would give a NaN loss (0 / 0)."""
    keep = (w.labels[:, 1:] != IGNORE).any(1)
    return w if bool(keep.all()) else w.select(keep)


# ---------------------------------------------------------------------------------------------
# Cache


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-prune" / "data"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = json.dumps([tokenizer.chat_template, tokenizer.eos_token_id, tokenizer.pad_token_id])
    return {
        "name_or_path": str(tokenizer.name_or_path),
        "sha256": hashlib.sha256((state + extra).encode()).hexdigest(),
    }


def _file_fingerprint(path: str) -> list[list[Any]]:
    p = Path(path).resolve()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _cache_key(src: DataSource, cfg: DataConfig, seq_len: int, tok_fp: dict[str, str]) -> dict[str, Any]:
    return {
        "version": CACHE_VERSION,
        "tokenizer": tok_fp,
        "files": _file_fingerprint(src.path),
        "format": src.format,
        "text_field": src.text_field,
        "seq_len": seq_len,
        "packing": cfg.packing,
        "truncation": cfg.truncation,
        "train_on_prompt": cfg.train_on_prompt,
    }


def _cache_path(cfg: DataConfig, key: dict[str, Any]) -> Path | None:
    if cfg.cache_dir == "none":
        return None
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    for p in (root, *root.parents):  # before tokenizing, not when the entry is stored after it
        if p.exists():
            if not p.is_dir():
                raise DataError(
                    f"data.cache_dir={cfg.cache_dir or root}: {p} is a file, not a directory; point data.cache_dir "
                    "at a directory, or set data.cache_dir=none"
                )
            break
    return root / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _load_cached(path: Path | None) -> Windows | None:
    if path is None or not (path / "windows.npz").is_file():
        return None
    try:
        with np.load(path / "windows.npz") as z:
            return Windows(**{k: torch.from_numpy(z[k]) for k in z.files})
    except Exception as e:  # truncated or overwritten (zip, pickle or shape errors): tokenize again
        info(f"warning: tokenization cache entry {path} is unreadable ({type(e).__name__}: {e}); rebuilding it")
        shutil.rmtree(path, ignore_errors=True)
        return None


def _store(path: Path | None, w: Windows, key: dict[str, Any], stats: dict[str, Any]) -> None:
    """Written under a temporary name and renamed, so that a reader never sees half a cache entry."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
    np.savez(tmp / "windows.npz", **{k: v.numpy() for k, v in w.fields().items()})
    (tmp / "meta.json").write_text(json.dumps({"key": key, "stats": stats}, indent=1))
    try:
        tmp.rename(path)
    except OSError:  # another process wrote the same entry first
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Sources -> windows


def source_windows(
    src: DataSource,
    cfg: DataConfig,
    seq_len: int,
    tokenizer: PreTrainedTokenizerBase,
    tok_fp: dict[str, str],
    context: int | None = None,
    seq_key: str = "data.seq_len",
) -> tuple[Windows, bool]:
    """One source's windows (packed or padded, rows without targets dropped), and whether the cache held them."""
    if not Path(src.path).exists():
        raise DataError(f"{src.key}={src.path}: file not found")
    key = _cache_key(src, cfg, seq_len, tok_fp)
    path = _cache_path(cfg, key)
    cached = _load_cached(path)
    if cached is not None:
        return cached, True
    ds, plain = _read(src.path, src.key)
    fmt = _resolve_format(ds, src, plain, tokenizer)
    ids, labels, lengths = _encode(ds, fmt, src, tokenizer, cfg)
    where = f"{src.key}={src.path}"
    if cfg.packing:
        if len(ids) < seq_len:
            raise DataError(f"{where}: {len(ids)} tokens, fewer than one sequence of {seq_key}={seq_len}")
        w = pack(ids, labels, lengths, seq_len)
    else:
        pad_id = next(t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if t is not None)
        w = pad(ids, labels, lengths, seq_len, pad_id, cfg.truncation, where, context)
    rows = len(w)
    w = _with_targets(w)
    if len(w) == 0:
        raise DataError(
            f"{where}: no {'window' if cfg.packing else 'example'} has a token to train on: every target lies "
            "beyond data.seq_len or in a prompt; raise data.seq_len, or set data.train_on_prompt=true"
        )
    stats = {
        "format": fmt,
        "records": len(ds),
        "tokens": len(ids),
        "target_fraction": float((labels != IGNORE).mean()),
        "rows": len(w),
        "rows_without_targets": rows - len(w),
    }
    info(
        f"{where}: {fmt}, {len(ds):,} records, {len(ids):,} tokens ({stats['target_fraction']:.0%} targets) -> "
        f"{len(w):,} {'windows' if cfg.packing else 'rows'} of {seq_len}"
        + (f" ({rows - len(w)} without targets dropped)" if rows > len(w) else "")
    )
    _store(path, w, key, stats)
    return w, False


def _weighted(n: int, weight: float, rng: np.random.Generator) -> np.ndarray:
    """``weight`` epochs of ``n`` rows: whole copies, then a seeded subset for the fraction."""
    whole, frac = int(weight), weight - int(weight)
    part = np.sort(rng.permutation(n)[: round(frac * n)])
    return np.concatenate([np.tile(np.arange(n), whole), part]).astype(np.int64)


def build_split(
    cfg: DataConfig, split: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0, context: int | None = None
) -> Windows:
    """The windows of ``split`` (train: data.train + data.mix, weighted; eval: data.eval, first
    ``eval_max_tokens`` tokens), in this process, using and filling the cache."""
    seq_len = (cfg.eval_seq_len or cfg.seq_len) if split == "eval" else cfg.seq_len
    seq_key = "data.eval_seq_len" if split == "eval" and cfg.eval_seq_len else "data.seq_len"
    if context is not None and seq_len > context:
        raise DataError(
            f"{seq_key}={seq_len} is longer than the model's context (max_position_embeddings={context}): "
            f"lower {seq_key}"
        )
    sources = cfg.sources(split)
    tok_fp = tokenizer_fingerprint(tokenizer)
    parts = []
    for i, src in enumerate(sources):
        w, hit = source_windows(src, cfg, seq_len, tokenizer, tok_fp, context, seq_key)
        if hit:
            info(f"{src.key}={src.path}: cache hit, {len(w):,} rows of {seq_len} (not tokenized again)")
        elif not D.is_main() and cfg.cache_dir != "none":
            note(f"{src.key}={src.path}: rank 0's cache entry is not visible here (data.cache_dir not shared?)")
        if split == "train" and src.weight != 1.0:
            pick = _weighted(len(w), src.weight, np.random.default_rng([seed, i]))
            if len(pick) == 0:
                raise DataError(f"{src.key}: weight {src.weight} of {len(w)} rows selects none; raise the weight")
            w = w.select(torch.from_numpy(pick))
        parts.append(w)
    out = Windows.cat(parts)
    if split == "eval" and cfg.eval_max_tokens:
        if out.attention_mask is None:
            out = out.select(slice(0, max(cfg.eval_max_tokens // seq_len, 1)))
        else:  # whole examples while they fit
            fits = int((out.attention_mask.sum(1).cumsum(0) <= cfg.eval_max_tokens).sum())
            out = out.select(slice(0, max(fits, 1)))
    return out


def load_split(
    cfg: DataConfig, split: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0, context: int | None = None
) -> Windows:
    """``build_split`` on every rank of a job: rank 0 first (it tokenizes and fills the cache), then the
    others (cache hits on a shared file system). A failure on any rank stops every rank, rank 0's with
    its message; every rank makes the same broadcast and all-reduce."""
    windows, error = None, None
    if D.is_main():
        try:
            windows = build_split(cfg, split, tokenizer, seed, context)
        except Exception as e:  # passed on, so that the other ranks do not wait forever
            error = e
    msg = D.broadcast_object(None if error is None else (isinstance(error, InputError), str(error)))
    if error is not None:
        raise error
    if msg is not None:
        is_input, text = msg
        raise DataError(text) if is_input else RuntimeError(f"rank 0 failed to prepare data.{split}: {text}")
    if windows is None:
        try:
            windows = build_split(cfg, split, tokenizer, seed, context)
        except Exception as e:  # e.g. a file only rank 0's node has
            error = e
    failed = D.all_reduce_sum(torch.tensor([float(error is not None)], device=D.comm_device()))
    if error is not None:
        raise error
    if failed.item():
        raise DataError(f"data.{split}: another rank could not prepare its data; see that rank's message")
    return windows


def note(msg: str) -> None:
    """A message from a rank other than 0 (``info`` prints on rank 0 only)."""
    print(f"[prune rank {D.rank()}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Batches


class TrainBatches:
    def __init__(
        self, blocks: Windows | torch.Tensor, micro_batch: int, grad_accum: int, world: int, rank: int, seed: int
    ):
        self.blocks = Windows.of(blocks)
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
        """Model inputs for 1-based optimizer ``step`` and micro-batch ``micro`` on this rank."""
        start = (step - 1) * self.global_batch + (micro * self.world + self.rank) * self.mbs
        idx = []
        for g in range(start, start + self.mbs):
            epoch, pos = divmod(g, len(self.blocks))
            idx.append(int(self._perm(epoch)[pos]))
        return self.blocks.batch(idx)


def eval_batches(
    blocks: Windows | torch.Tensor, micro_batch: int, world: int, rank: int
) -> list[tuple[dict[str, torch.Tensor], bool]]:
    """This rank's eval batches; every rank gets the same number (ZeRO-3 forwards are collective),
    padded with repeats flagged ``False`` so they are not counted."""
    w = Windows.of(blocks)
    mine = torch.arange(rank, len(w), world)
    n_batches = -(-((len(w) + world - 1) // world) // micro_batch)
    out = []
    for b in range(n_batches):
        idx = mine[b * micro_batch : (b + 1) * micro_batch]
        out.append((w.batch(idx), True) if len(idx) else (w.batch([0]), False))
    return out


# ---------------------------------------------------------------------------------------------
# Plain text, as tools read it


def load_texts(path: str, text_field: str, key: str) -> datasets.Dataset:
    """The texts of a plain text file (one document) or of a record file's ``text_field``, as a
    dataset with one column ``text``."""
    ds, plain = _read(path, key)
    if plain:
        return ds
    _resolve_format(ds, DataSource(key, path, "text", text_field), False, None)
    ds = ds.select_columns([text_field])
    return ds.rename_column(text_field, "text") if text_field != "text" else ds


def tokenize_to_blocks(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, seq_len: int, key: str, path: str, max_tokens: int = 0
) -> torch.Tensor:
    """All documents of a ``text`` dataset, each followed by EOS, concatenated and cut into [n, seq_len] ids."""
    src = DataSource(key, path, "text", "text")
    ids, _, _ = _encode(ds, "text", src, tokenizer, DataConfig(num_proc=1))
    if max_tokens:
        ids = ids[:max_tokens]
    n = len(ids) // seq_len
    if n == 0:
        raise DataError(f"{key}={path}: {len(ids)} tokens, fewer than one sequence of data.seq_len={seq_len}")
    return torch.from_numpy(ids[: n * seq_len].astype(np.int64)).view(n, seq_len)
