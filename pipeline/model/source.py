"""Where a base model comes from: a local directory, a GGUF file, or a Hugging Face repo id.

Everything downstream (loading in NF4, structure discovery, export) reads one local Hugging Face
directory, so the other two forms are resolved to one first:

- a ``.gguf`` file (llama.cpp's format) is dequantized by transformers' GGUF reader once and saved
  as an fp32 safetensors directory in a cache keyed by the file's size and header hash; the
  directory's ``source.json`` names the file, so the export's model card can record it;
- a repo id (``org/name``) is looked up in the local Hugging Face cache only: runs never download,
  and a model that is not cached is an error that says how to fetch it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import InputError

SOURCE_FILE = "source.json"  # written into converted directories: where the weights came from
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class ModelError(InputError):
    """A model path that cannot be used, with the fix in the message."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # dir | gguf | hub
    given: str  # what the user wrote in model.path
    path: Path  # the gguf file, the cached snapshot, or the directory


def default_cache() -> Path:
    return Path(os.environ.get("LORA_PRUNE_CACHE", Path.home() / ".cache" / "lora-prune")) / "gguf"


def classify(path: str) -> ModelSource:
    """Cheap: no weights are read. Raises ModelError naming model.path and the fix."""
    p = Path(path).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ModelError(f"model.path={path}: no such GGUF file")
        return ModelSource("gguf", path, p)
    if p.is_dir():
        check_model_dir(p, path)
        return ModelSource("dir", path, p)
    if _is_repo_id(path):
        return ModelSource("hub", path, _hub_snapshot(path))
    raise ModelError(
        f"model.path={path}: not a directory, a .gguf file, or a Hugging Face repo id (org/name); "
        "point it at a local model directory"
    )


def _is_repo_id(path: str) -> bool:
    """``org/name`` that is not a local path."""
    return bool(_REPO_ID.match(path)) and not Path(path).expanduser().exists()


def check_model_dir(d: Path, given: str) -> None:
    """Cheap (headers only): a model directory whose config and safetensors files are whole."""
    if (d / "summary.json").is_file() and (d / "adapter").is_dir():
        raise ModelError(
            f"model.path={given}: this is a pruning run's directory (output.dir), not a model; make a model "
            f"of it first with tools/compact.py --run {given} --out DIR, and use DIR"
        )
    if not (d / "config.json").is_file():
        raise ModelError(f"model.path={given}: no config.json; is this a Hugging Face model directory?")
    try:
        conf = json.loads((d / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"model.path={given}: {d / 'config.json'} is not valid JSON ({e}); restore it") from None
    if not isinstance(conf, dict):
        raise ModelError(f"model.path={given}: {d / 'config.json'} is not a JSON object; restore it")
    if not any((d / f).is_file() for f in _WEIGHT_FILES):
        raise ModelError(
            f"model.path={given}: no weights ({' or '.join(_WEIGHT_FILES[:2])}); save the model with save_pretrained"
        )
    for f in sorted(d.glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem:
            raise ModelError(f"model.path={given}: {f.name} {problem}; download or save the model again")


def safetensors_problem(f: Path) -> str | None:
    """Why a safetensors file cannot be whole (header unreadable, data shorter than the header says), or None."""
    size = f.stat().st_size
    try:
        with f.open("rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                return f"is truncated or not a safetensors file ({size} bytes)"
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return f"has an unreadable header ({e})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max(ends, default=0)
    if size < need:
        return f"is truncated: {size} bytes, its header describes {need}"
    return None


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    # Read at call time (the hub client fixes its default when first imported).
    cache = (
        os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub"
    )
    try:
        snap = Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache))
    except (LocalEntryNotFoundError, OSError, ValueError) as e:
        raise ModelError(
            f"model.path={repo_id}: not in the local Hugging Face cache ({type(e).__name__}); runs never download. "
            f"Fetch it first with `hf download {repo_id}` (or `huggingface-cli download {repo_id}`) on a machine "
            "with network access, set HF_HOME to that cache, or point model.path at a local directory"
        ) from None
    check_model_dir(snap, repo_id)
    return snap


def gguf_key(f: Path) -> str:
    """Size plus a hash of the first MiB (header and metadata): cheap, and changes with the file."""
    h = hashlib.sha256()
    with f.open("rb") as fh:
        h.update(fh.read(1 << 20))
    return f"{f.stem}-{f.stat().st_size}-{h.hexdigest()[:16]}"


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF causal LM into an fp32 safetensors directory (written atomically)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"model.path={gguf}: transformers cannot read this GGUF file: {e}") from None
    # The loaded model is flagged as GGUF-quantized and save_pretrained refuses it; a fresh model
    # of the same config without the quantization entry takes its (already dequantized) weights.
    cfg_dict = src.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg = AutoConfig.for_model(**cfg_dict)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelError(
            f"model.path={gguf}: converted weights do not match the config (missing {missing[:4]}, "
            f"unexpected {unexpected[:4]})"
        )
    if cfg.tie_word_embeddings:
        model.tie_weights()
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    (tmp / SOURCE_FILE).write_text(
        json.dumps({"format": "gguf", "file": gguf.name, "path": str(gguf.resolve()), "key": gguf_key(gguf)}, indent=1)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, out)
    except OSError:  # another rank or process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").is_file():
            raise
    return out


def resolve(src: ModelSource) -> Path:
    """The local Hugging Face directory for a source (converts a GGUF file once, then reuses it)."""
    if src.kind != "gguf":
        return src.path
    out = default_cache() / gguf_key(src.path)
    if (out / "config.json").is_file():
        return out
    return convert_gguf(src.path, out)


def resolve_model_dir(path: str, key: str = "model.path") -> Path:
    """``key`` is the config key the path came from, for the messages (model.path, distill.teacher)."""
    try:
        return resolve(classify(path))
    except ModelError as e:
        if key == "model.path":
            raise
        raise ModelError(str(e).replace("model.path=", f"{key}=")) from None


def source_record(model_dir: Path, given: str) -> dict[str, str]:
    """What the model card and summary say about where the base came from."""
    f = Path(model_dir) / SOURCE_FILE
    if f.is_file():
        rec = json.loads(f.read_text())
        return {"format": rec.get("format", "gguf"), "file": rec.get("file", ""), "given": given}
    if _is_repo_id(given):
        return {"format": "hub", "repo_id": given, "given": given}
    return {"format": "dir", "given": given}
