"""The run directory: the contract with ``tools/compact.py``.

``output.dir`` holds, once a run finishes (``summary.json`` is written last):
  adapter/adapter_model.safetensors, adapter/adapter_config.json  PEFT LoRA adapter (full tensors)
  adapter/README.md   the adapter's card: what it is, what it was trained with
  widths.png          kept heads and channels per layer
  masks.safetensors   heads [layers, num_attention_heads], channels [layers, intermediate]; 1 = kept
  scores.safetensors  smoothed unit scores (heads [layers, head_units], channels [layers, intermediate])
  shrink.safetensors  only after pruning.shrink cut the model: each shrink's step and kept original indices
                      per layer (pipeline/train/shrink.py ShrinkHistory); the adapter is saved at the base's
                      shapes (zeros for removed units), so export and --verify replay the cuts on the base
  resolved_config.yaml  the resolved run config (a name no input config is expected to have)
  train_log.jsonl     one row per logged step
  summary.json        per-layer kept heads/channels, target and achieved sparsity, losses, perplexity
  tb/                 TensorBoard logs
Files are written under a temporary name and renamed, so a crash never leaves a half file under
a final name.

Training checkpoints (``train.save_every``, SIGTERM) live in ``output.dir/checkpoints/``:
  step-00000040/engine/   DeepSpeed engine state: LoRA weights, optimizer, LR schedule (frozen base excluded)
  step-00000040/pruning.safetensors   masks, smoothed scores, decision history, rank-pruning state
  step-00000040/rng/rank-00000.pt     Python, NumPy and torch RNG states of each rank
  step-00000040/state.json            step, world size, run config, bad steps, eval before training
  step-00000040/manifest.json         size and SHA-256 of every file above; written last
  latest                              name of the newest complete checkpoint; updated after the rename
A checkpoint is written as ``.partial-step-N`` and renamed once its manifest is complete, so a
killed write never shadows the previous checkpoint; on resume, a checkpoint whose files do not
match its manifest (truncated, missing) is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from benchmarks.report import WIDTHS_PNG
from pipeline.config.schema import Config, InputError, resumable_keys, save_config
from pipeline.dist import comm as D
from pipeline.model.structure import structure_from_config
from pipeline.train.logs import TRAIN_LOG, WANDB_ID, dumps, info

if TYPE_CHECKING:
    from pipeline.train.shrink import ShrinkHistory

SUMMARY = "summary.json"  # written last: a run directory with it is a finished run
RUN_CONFIG = "resolved_config.yaml"
LEGACY_RUN_CONFIG = "config.yaml"  # what runs before resolved_config.yaml called it
CHECKPOINTS = "checkpoints"
SHRINK_FILE = "shrink.safetensors"  # a shrunk run's cuts (pipeline/train/shrink.py), replayed by export
ADAPTER = "adapter"
# What a run writes at the top of output.dir (wandb/ is shared by every W&B run logged there).
RUN_FILES = (
    SUMMARY,
    RUN_CONFIG,
    ADAPTER,
    "masks.safetensors",
    "scores.safetensors",
    SHRINK_FILE,
    WIDTHS_PNG,
    TRAIN_LOG,
    "tb",
    CHECKPOINTS,
    WANDB_ID,
)
LATEST = "latest"
MANIFEST = "manifest.json"
STATE = "state.json"
TENSORS = "pruning.safetensors"
ENGINE_TAG = "engine"
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Keys that may differ between the run that wrote a checkpoint and the run resuming it (marked on the
# config fields); any other difference is refused.
RESUMABLE_CHANGES = resumable_keys()


class OutputError(InputError):
    pass


class CheckpointError(InputError):
    pass


# ---------------------------------------------------------------------------------------------
# Training checkpoints


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _step_of(path: Path) -> int | None:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else None


def step_dirs(root: Path) -> list[Path]:
    """Checkpoint directories under ``root`` (complete or not), newest step first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=lambda p: _step_of(p) or 0, reverse=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(ckpt: Path) -> None:
    files = {str(p.relative_to(ckpt)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in _files(ckpt)}
    _atomic(ckpt / MANIFEST, lambda p: p.write_text(dumps({"files": files}, indent=1)))


def verify(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from, or None when every file matches its manifest."""
    try:
        listed = json.loads((ckpt / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return "no manifest.json (the write did not finish)"
    except (ValueError, KeyError) as e:
        return f"unreadable manifest.json ({e})"
    for rel, meta in listed.items():
        f = ckpt / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != meta["size"]:
            return f"{rel} has {f.stat().st_size} bytes, the manifest says {meta['size']} (truncated?)"
        if _sha256(f) != meta["sha256"]:
            return f"{rel} does not match its SHA-256 in the manifest (corrupt)"
    for need in (STATE, TENSORS):
        if need not in listed:
            return f"the manifest does not list {need}"
    return None


def _candidates(root: Path) -> list[Path]:
    """Every step directory, newest first. ``latest`` is for people and tools; it does not decide, since a
    stale one (an older step, restored from a backup, edited) would set newer complete checkpoints aside."""
    found = step_dirs(root)
    pointer = root / LATEST
    if pointer.is_file() and found and pointer.read_text().strip() != found[0].name:
        info(f"warning: {pointer} names {pointer.read_text().strip()!r}, not the newest {found[0].name}; ignoring it")
    return found


def find_checkpoint(where: Path, explicit: bool) -> Path | None:
    """The newest complete checkpoint at ``where`` (a checkpoint, a checkpoints dir or an output dir).

    Broken ones are skipped with a warning; with ``explicit`` (train.resume=PATH) finding none is an error.
    """
    if (where / MANIFEST).exists() or (where / STATE).exists() or (where / ENGINE_TAG).is_dir():
        reason = verify(where)
        if reason is None:
            return where
        raise CheckpointError(
            f"train.resume={where}: checkpoint is incomplete or corrupt: {reason}; point train.resume at "
            "another checkpoint (or at the output dir to pick the newest complete one)"
        )
    root = where / CHECKPOINTS if (where / CHECKPOINTS).is_dir() else where
    for ckpt in _candidates(root):
        reason = verify(ckpt)
        if reason is None:
            return ckpt
        info(f"warning: skipping checkpoint {ckpt}: {reason}")
    if explicit:
        raise CheckpointError(f"train.resume={where}: no complete checkpoint found there")
    return None


def read_state(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / STATE).read_text())


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resumable(ckpt: Path, cfg: Config, world: int, fingerprints: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint's state, after checking this run can continue it exactly: same world size, same
    config (but RESUMABLE_CHANGES), and the same base model and data files (``fingerprints``)."""
    from pipeline.model.fingerprint import compare

    state = read_state(ckpt)
    problems = []
    if fingerprints is not None and state.get("fingerprints") is not None:
        changed = compare(state["fingerprints"], fingerprints)
        if changed:
            problems.append(
                "its inputs changed since it was written (" + "; ".join(changed) + "): restore the original "
                "files to resume; the run so far was trained on them"
            )
    if state["world_size"] != world:
        problems.append(
            f"it was written by {state['world_size']} ranks; this run has {world}. Data order, ZeRO-3 partitions "
            f"and RNG streams are per rank: relaunch with {state['world_size']} ranks (e.g. deepspeed --num_gpus "
            f"{state['world_size']} ... on one node)"
        )
    old, new = _flat(state["config"]), _flat(cfg.to_dict())
    diffs = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)
    ]
    if diffs:
        problems.append(
            f"it was written with a different config ({'; '.join(diffs)}); set these back to resume exactly"
        )
    if problems:
        raise CheckpointError(
            f"cannot resume checkpoint {ckpt}: "
            + "; and ".join(problems)
            + ". Or start over with train.resume=none output.overwrite=true (or use another output.dir)"
        )
    if state["step"] > cfg.train.steps:
        raise CheckpointError(f"checkpoint {ckpt} is at step {state['step']}, past train.steps={cfg.train.steps}")
    return state


def resolve_resume(
    cfg: Config, world: int, out: Path | None = None, fingerprints: dict[str, Any] | None = None
) -> tuple[Path | None, dict[str, Any] | None]:
    """Which checkpoint this run continues (the same on every rank; rank 0 reads the disk), and its state.

    ``out``: the directory this run writes to (default output.dir). Called before any heavy work, so a
    wrong world size, config or changed input file stops the run at once.
    """
    out = Path(cfg.output.dir) if out is None else out
    finished = (out / SUMMARY).exists()  # only reached with output.overwrite=true
    choice: tuple[str | None, str | None] = (None, None)
    if D.is_main():
        try:
            r = cfg.train.resume
            if r == "auto" and not finished:
                found = find_checkpoint(out, explicit=False)
            elif r not in ("auto", "none"):
                found = find_checkpoint(Path(r), explicit=True)
            else:
                found = None
            choice = (str(found) if found else None, None)
        except CheckpointError as e:
            choice = (None, str(e))
    path, err = D.broadcast_object(choice)
    if err:
        raise CheckpointError(err)
    if path is None:
        existing = step_dirs(out / CHECKPOINTS)
        if existing and not finished and not cfg.output.overwrite and cfg.train.resume == "auto":
            raise CheckpointError(
                f"output.dir={out}: none of its {len(existing)} checkpoint(s) is complete (see the warnings above: "
                "truncated, corrupt or unfinished); point train.resume at a good copy of one, or start over with "
                "train.resume=none output.overwrite=true (they move to checkpoints.replaced.N, not deleted)"
            )
        if existing and not finished and not cfg.output.overwrite:
            raise CheckpointError(
                f"output.dir={out} holds checkpoints of an unfinished run (newest: {existing[0].name}) and "
                f"train.resume={cfg.train.resume}; resume it with train.resume=auto, start over with "
                "output.overwrite=true (its checkpoints move to checkpoints.replaced.N/), or use another output.dir"
            )
        return None, None
    return Path(path), check_resumable(Path(path), cfg, world, fingerprints)


def start_fresh(out: Path) -> None:
    """Rank 0, before the first step of a run that does not resume: an earlier run's checkpoints and
    summary (only here with output.overwrite=true) move aside, so a later train.resume=auto finds this run's.
    Nothing is deleted: each earlier set gets its own name (checkpoints.replaced.1, .2, ...)."""
    from pipeline.train.rundir import free_name

    root = out / CHECKPOINTS
    if root.exists():
        aside = free_name(out, f"{CHECKPOINTS}.replaced")
        os.replace(root, aside)
        info(f"output.overwrite: the earlier run's checkpoints are now in {aside} (delete it when no longer needed)")
    if (out / SUMMARY).exists():
        os.replace(out / SUMMARY, free_name(out, "summary.replaced.json"))
    (out / WANDB_ID).unlink(missing_ok=True)  # a new run is a new W&B run; a resumed one keeps the id


def supersede_after(ckpt: Path) -> None:
    """Rank 0, on resume: checkpoints newer than the one resumed belong to an abandoned timeline
    (skipped as broken, or passed over by train.resume=PATH); they are set aside, not deleted."""
    root = ckpt.parent
    step = _step_of(ckpt) or 0
    for other in step_dirs(root):
        if (_step_of(other) or 0) > step:
            aside = root / f".superseded-{other.name}"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(other, aside)
            info(f"set aside {other.name} (newer than the resumed {ckpt.name}) as {aside.name}")
    if root.name == CHECKPOINTS:
        _atomic(root / LATEST, lambda p: p.write_text(ckpt.name + "\n"))


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    engine: Any, out: Path, step: int, state: dict[str, Any], tensors: dict[str, torch.Tensor], keep_last: int
) -> Path:
    """Write a complete checkpoint of ``step`` (collective: every rank), then retire old ones."""
    root = out / CHECKPOINTS
    final = root / step_name(step)
    partial = root / f".partial-{final.name}"
    if D.is_main():
        shutil.rmtree(partial, ignore_errors=True)
        (partial / "rng").mkdir(parents=True)
    D.barrier()
    engine.save_checkpoint(str(partial), tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)
    torch.save(rng_state(), partial / "rng" / f"rank-{D.rank():05d}.pt")
    if D.is_main():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial / TENSORS))
        (partial / STATE).write_text(dumps(state, indent=1))
    D.barrier()  # every rank's files are on disk
    if D.is_main():
        write_manifest(partial)
        old = root / f".old-{final.name}"
        if final.exists():  # the same step again after a resume: replace only once the new one is complete
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(partial, final)
        _atomic(root / LATEST, lambda p: p.write_text(final.name + "\n"))
        shutil.rmtree(old, ignore_errors=True)
        for stale in step_dirs(root)[keep_last:]:
            shutil.rmtree(stale, ignore_errors=True)
        for leftover in root.glob(".partial-*"):  # writes killed earlier
            shutil.rmtree(leftover, ignore_errors=True)
    D.barrier()
    return final


def load_checkpoint(engine: Any, ckpt: Path) -> dict[str, torch.Tensor]:
    """Restore the engine (weights, optimizer, LR schedule) and this rank's RNG; returns the pruning tensors."""
    loaded, _ = engine.load_checkpoint(
        str(ckpt),
        tag=ENGINE_TAG,
        load_module_strict=False,  # the frozen base is not in the checkpoint
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if loaded is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt / ENGINE_TAG}; point train.resume at another checkpoint")
    rng = ckpt / "rng" / f"rank-{D.rank():05d}.pt"
    set_rng_state(torch.load(rng, weights_only=False))  # our own file, listed in the verified manifest
    return load_file(str(ckpt / TENSORS))


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def save_adapter(
    model: nn.Module,
    out_dir: Path,
    alive: dict[str, torch.Tensor] | None = None,
    expand: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> None:
    """Save the PEFT adapter with full tensors; gathers ZeRO-3 shards (collective on every rank).

    ``expand`` (a shrunk run): each factor back at the base's original shape, zeros for removed units.

    With rank pruning (``alive``: kept components per module path), each module is saved at its
    kept rank: ``rank_pattern`` holds the ranks and ``alpha_pattern`` keeps ``alpha / r`` unchanged.
    """
    named = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    with D.gathered([p for _, p in named]):
        state = {n: p.detach().to("cpu", copy=True) for n, p in named} if D.is_main() else {}
    if not D.is_main():
        return
    if expand is not None:
        state = {n: expand(n, t) for n, t in state.items()}
    peft_cfg = model.peft_config["default"]
    if alive:
        scale = peft_cfg.lora_alpha / peft_cfg.r
        for module, keep in alive.items():
            for key in [k for k in state if k.startswith(f"base_model.model.{module}.lora_")]:
                state[key] = state[key][keep] if ".lora_A." in key else state[key][:, keep]
            r = int(keep.sum())
            peft_cfg.rank_pattern[module] = r
            peft_cfg.alpha_pattern[module] = scale * r
    tmp = out_dir / ".tmp-adapter"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
    final = out_dir / "adapter"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def save_run(
    model: nn.Module,
    cfg: Config,
    masks_sd: dict[str, torch.Tensor],
    scores_sd: dict[str, torch.Tensor],
    summary: dict[str, Any],
    alive: dict[str, torch.Tensor] | None = None,
    model_dir: Path | None = None,
    out: Path | None = None,
    shrink: ShrinkHistory | None = None,
) -> None:
    """Every rank; ``out``: the directory this run writes to (default output.dir). A shrunk run also
    writes its shrink history (``shrink.safetensors``), which export replays."""
    out = Path(cfg.output.dir) if out is None else out
    shrunk = shrink is not None and bool(shrink.events)
    s = structure_from_config(getattr(model, "config", None) or model.get_base_model().config) if shrunk else None
    save_adapter(model, out, alive, (lambda n, t: shrink.expand_lora(n, t, s)) if shrunk else None)
    if D.is_main():
        if shrunk:
            _atomic(out / SHRINK_FILE, shrink.save)
        if model_dir is not None:  # replaces PEFT's empty template
            from pipeline.export.cards import adapter_card

            _atomic(out / "adapter" / "README.md", lambda p: adapter_card(cfg, summary, model_dir).save(p))
        _atomic(out / "masks.safetensors", lambda p: save_file(masks_sd, str(p)))
        _atomic(
            out / "scores.safetensors", lambda p: save_file({k: v.contiguous() for k, v in scores_sd.items()}, str(p))
        )
        _atomic(out / RUN_CONFIG, lambda p: save_config(cfg, p))
        write_summary(out, summary)
    D.barrier()


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """summary.json, the file that marks a run finished (rank 0)."""
    _atomic(out / SUMMARY, lambda p: p.write_text(dumps(summary, indent=2)))
