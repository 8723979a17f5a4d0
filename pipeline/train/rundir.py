"""The run directory's safety rules: one run at a time, and a finished run replaced only by a finished one.

- ``output.dir/.lock`` (rank 0, from start-up to exit) holds the pid, host and start time of the run
  writing there; a second run is refused. A lock whose process is gone (same host) is stale: it is
  taken over with a warning. On another host the pid cannot be checked: the message says what to do.
- ``output.overwrite=true`` over a finished run works in ``output.dir/.incoming/`` until it has
  written its ``summary.json``; only then does the earlier run move, whole, to ``output.dir/replaced.N/``
  (still a complete run directory) and the new one take its place. A run that fails or is killed before
  that leaves the earlier run untouched; running the same command again resumes the new one there.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config.schema import Config
from pipeline.dist import comm as D
from pipeline.train.checkpoint import RUN_FILES, SUMMARY, OutputError
from pipeline.train.logs import info
from pipeline.train.stops import RunStopped

LOCK = ".lock"
INCOMING = ".incoming"
REPLACED = "replaced"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def first_existing_file(path: Path) -> Path | None:
    """``path`` itself or the nearest of its parents that is a file (then nothing can be created there)."""
    for p in (path, *path.parents):
        if p.exists():
            return p if not p.is_dir() else None
    return None


def free_name(parent: Path, stem: str) -> Path:
    """``parent/stem.1``, ``stem.2``, ...: the first that does not exist (set-aside copies are never deleted)."""
    n = 1
    while (parent / f"{stem}.{n}").exists():
        n += 1
    return parent / f"{stem}.{n}"


class OutputLock:
    """The lock file of an output directory; ``release`` removes it (and a directory it created, if empty)."""

    def __init__(self, path: Path, created_dir: bool) -> None:
        self.path = path
        self.created_dir = created_dir

    @classmethod
    def acquire(cls, out: Path) -> OutputLock:
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        path = out / LOCK
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(path)
                if holder is None:  # being written this instant, or emptied: someone else's either way
                    time.sleep(0.2)
                    holder = _read_lock(path)
                if holder and holder.get("host") == me["host"] and not pid_alive(int(holder.get("pid", -1))):
                    info(
                        f"warning: {path} was left by process {holder.get('pid')} (started {holder.get('started')}), "
                        "which is no longer running on this host; taking the lock over"
                    )
                    path.unlink(missing_ok=True)
                    continue
                who = (
                    f"process {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')}"
                    if holder
                    else "a lock file that cannot be read"
                )
                if created:
                    _rmdir_if_empty(out)
                raise OutputError(
                    f"output.dir={out} is in use by another run ({who}; lock {path}). Wait for that run to end "
                    f"or choose another output.dir; if no run is using it (e.g. one that died on another host), "
                    f"delete {path} and run again"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return cls(path, created)
        raise OutputError(f"output.dir={out}: could not take the lock {path}; delete it if no run is using it")

    def release(self) -> None:
        holder = _read_lock(self.path)
        if holder and holder.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        if self.created_dir:
            _rmdir_if_empty(self.path.parent)


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _rmdir_if_empty(d: Path) -> None:
    with contextlib.suppress(OSError):
        d.rmdir()


def check_output_dir(cfg: Config) -> None:
    """Refuse an output.dir that cannot be written, or a finished run not to be replaced."""
    out = Path(cfg.output.dir)
    blocker = first_existing_file(out)
    if blocker is not None:
        where = "is a file" if blocker == out else f"is under {blocker}, which is a file"
        raise OutputError(f"output.dir={cfg.output.dir} {where}; choose a directory path for output.dir")
    done = out / SUMMARY
    if done.exists() and not cfg.output.overwrite:
        raise OutputError(
            f"output.dir={cfg.output.dir} already holds a finished run ({done}); choose another "
            "output.dir or set output.overwrite=true (the earlier run is kept until the new one finishes)"
        )


def prepare_output(cfg: Config) -> tuple[Path, OutputLock | None]:
    """Every rank: the directory this run writes to (``output.dir``, or ``.incoming`` under it when it
    replaces a finished run) and, on rank 0, the lock held until exit. Errors reach every rank."""
    out = Path(cfg.output.dir)
    lock: OutputLock | None = None
    choice: tuple[str | None, str | None] = (None, None)
    if D.is_main():
        try:
            check_output_dir(cfg)
            lock = OutputLock.acquire(out)
            if (out / INCOMING / SUMMARY).exists():  # a replacing run finished but was killed before its move
                info(f"{out / INCOMING} holds a finished run that was to replace {out}; completing that first")
                promote(out / INCOMING, out)
            work = out / INCOMING if (out / SUMMARY).exists() else out
            if work != out:
                info(f"output.overwrite: {out} holds a finished run; it stays whole until this run finishes in {work}")
            choice = (str(work), None)
        except OutputError as e:
            choice = (None, str(e))
    work_s, err = D.broadcast_object(choice)
    if err:
        raise OutputError(err)
    return Path(work_s), lock


def promote(work: Path, out: Path) -> Path | None:
    """Rank 0, once the run in ``work`` (``out/.incoming``) has written its summary: the earlier run moves
    whole to ``out/replaced.N`` and this one takes its place. Returns where the earlier run went."""
    if work == out:
        return None
    aside = free_name(out, REPLACED)
    aside.mkdir()
    # The earlier run's summary first: from here on ``out`` no longer looks finished until the new one is in.
    names = [SUMMARY] + [n for n in RUN_FILES if n != SUMMARY] + [p.name for p in work.iterdir()]
    for name in dict.fromkeys(names):
        if (out / name).exists() or (out / name).is_symlink():
            os.replace(out / name, aside / name)
    for p in sorted(work.iterdir(), key=lambda p: p.name == SUMMARY):  # the new summary last
        os.replace(p, out / p.name)
    work.rmdir()
    info(f"output.overwrite: the earlier run is now in {aside} (a complete run directory; delete it when done)")
    return aside


# ---------------------------------------------------------------------------------------------
# tools/compact.py's --out: staged beside it as .NAME.tmp-PID, published by rename

# What an export writes (pipeline/export/compact.py): a directory holding anything else is not replaced.
EXPORT_FILES = (
    "config.json",
    "generation_config.json",
    "README.md",
    "modeling_pruned.py",  # exports before the nemotron-nas layout
    "configuration_decilm.py",
    "modeling_decilm.py",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.*",
    "*.model",
)
EXPORT_TAG = "structured-pruning"  # in the front matter of every export's model card (pipeline/cards.TAGS)


def _staging_re(out: Path) -> re.Pattern[str]:
    return re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)$")


def staging_dir(out: Path, kind: str = "tmp") -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid()}"


def clean_stale_staging(out: Path) -> list[str]:
    """Staging directories beside ``out`` left by compacts that are no longer running (killed): removed.
    A ``.old-PID`` whose process died between the two renames is the previous export: put back when
    ``out`` is missing. Returns one line per action, for the log."""
    notes = []
    if not out.parent.is_dir():
        return notes
    pattern = _staging_re(out)
    for p in sorted(out.parent.iterdir()):
        m = pattern.match(p.name)
        if not m or int(m[2]) == os.getpid() or pid_alive(int(m[2])):
            continue
        if m[1] == "old" and not out.exists():
            os.replace(p, out)
            notes.append(f"restored {out} from {p.name}, left by process {m[2]} (no longer running)")
            continue
        shutil.rmtree(p, ignore_errors=True)
        notes.append(f"removed {p}, a staging directory left by process {m[2]} (no longer running)")
    return notes


def is_export(d: Path) -> bool:
    """Whether ``d`` holds a model written by tools/compact.py: config, safetensors weights, and its card."""
    card = d / "README.md"
    if not ((d / "config.json").is_file() and card.is_file() and any(d.glob("*.safetensors"))):
        return False
    head = card.read_text(errors="replace")[:4000]
    return head.startswith("---") and EXPORT_TAG in head.split("---", 2)[1]


def check_replaceable(out: Path) -> None:
    """--overwrite replaces only a previous export, and only one holding nothing else."""
    if not is_export(out):
        raise OutputError(
            f"--out {out} is not empty and does not hold a model written by tools/compact.py (config.json, "
            "*.safetensors and its README.md card); --overwrite replaces only a previous export: choose another --out"
        )
    other = [
        str(p.relative_to(out))
        for p in sorted(out.rglob("*"))
        if p.is_file() and not any(fnmatch.fnmatch(str(p.relative_to(out)), pat) for pat in EXPORT_FILES)
    ]
    if other:
        raise OutputError(
            f"--out {out} holds a previous export but also files compact did not write ({', '.join(other[:8])}"
            f"{', ...' if len(other) > 8 else ''}); move them out first, or choose another --out"
        )


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """SIGTERM raises (RunStopped, exit 143) instead of killing the process, so ``finally`` blocks
    (removing a staging directory) run; the previous handler is restored after."""

    def handle(signum: int, frame: Any) -> None:
        raise RunStopped(f"{signal.Signals(signum).name}: stopped; nothing was published", 128 + signum)

    old = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
