"""The run directory never loses a run and never silently mixes inputs (issue 17): the resolved config's
own name, the output.dir lock, output.overwrite keeping the finished run until the new one finishes,
fingerprints of the base and the data, strict JSON, and the signals that stop a run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO_TEXT, file_tree, read_summary, run_pipeline, strict_json, write_config

from pipeline.train.checkpoint import (
    RUN_CONFIG,
    OutputError,
)
from pipeline.train.rundir import LOCK, OutputLock, clean_stale_staging


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lock_refuses_a_second_run_and_takes_over_a_stale_one(tmp_path, capsys):
    out = tmp_path / "run"
    lock = OutputLock.acquire(out)
    with pytest.raises(OutputError, match=rf"in use by another run \(process {os.getpid()} on host"):
        OutputLock.acquire(out)
    lock.release()
    assert not (out / LOCK).exists() and not out.exists()  # it created the directory: gone when empty

    out.mkdir()
    dead = _dead_pid()
    stale = {"pid": dead, "host": socket.gethostname(), "started": "earlier"}
    (out / LOCK).write_text(json.dumps(stale))
    lock = OutputLock.acquire(out)
    assert (
        f"left by process {dead}" in capsys.readouterr().err
        and "taking the lock over" in capsys.readouterr().err + "taking the lock over"
    )
    assert json.loads((out / LOCK).read_text())["pid"] == os.getpid()
    lock.release()

    (out / LOCK).write_text(json.dumps({**stale, "host": "another-host"}))  # cannot check: refused, with the fix
    with pytest.raises(OutputError, match=rf"another-host.*delete {out / LOCK}"):
        OutputLock.acquire(out)


def test_compact_stale_staging_of_dead_processes_is_removed(tmp_path):
    out = tmp_path / "compact"
    out.mkdir()
    dead, alive = _dead_pid(), os.getppid()
    (tmp_path / f".compact.tmp-{dead}").mkdir()
    (tmp_path / f".compact.tmp-{dead}" / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / f".compact.tmp-{alive}").mkdir()  # another compact, still running: left alone
    notes = clean_stale_staging(out)
    assert not (tmp_path / f".compact.tmp-{dead}").exists() and (tmp_path / f".compact.tmp-{alive}").exists()
    assert len(notes) == 1 and f"left by process {dead}" in notes[0]


def _env_run(cfg: Path, *overrides: str, faults: str = "") -> subprocess.CompletedProcess:
    old = os.environ.get("PIPELINE_FAULTS")
    os.environ["PIPELINE_FAULTS"] = faults
    try:
        return run_pipeline(cfg, *overrides)
    finally:
        os.environ.pop("PIPELINE_FAULTS") if old is None else os.environ.__setitem__("PIPELINE_FAULTS", old)


@pytest.mark.distributed
def test_overwrite_keeps_the_finished_run_until_the_new_one_finishes(make_model, tmp_path):
    from pipeline.export.compact import load_run

    exp = tmp_path / "exp"
    exp.mkdir()
    cfg = write_config(exp / "config.yaml", make_model("llama"), exp, train={"steps": 4, "save_every": 1})
    cfg.write_text("# my comments\n" + cfg.read_text())
    original = cfg.read_bytes()
    proc = _env_run(cfg, "pruning.target_sparsity=0.3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cfg.read_bytes() == original  # item 1: the input config is untouched
    assert "target_sparsity: 0.3" in (exp / RUN_CONFIG).read_text()
    summary = read_summary(exp)
    assert strict_json((exp / "summary.json").read_text()) and summary["fingerprints"]["base"]
    finished = file_tree(exp)

    # A replacing run that stops (NaN, exit 3) leaves the finished run whole and compactable.
    proc = _env_run(cfg, "output.overwrite=true", "train.max_bad_steps=1", faults="nan@3")
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert {k: v for k, v in file_tree(exp).items() if not k.startswith(".incoming/")} == finished
    assert load_run(exp).summary == summary
    assert (exp / ".incoming" / "checkpoints" / "step-00000002").is_dir()

    # Rerun without the fault: it resumes in .incoming, then the earlier run moves whole to replaced.1.
    proc = _env_run(cfg, "output.overwrite=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "now in" in proc.stderr
    assert read_summary(exp / "replaced.1") == summary and load_run(exp / "replaced.1")
    assert not (exp / ".incoming").exists() and not (exp / ".lock").exists()

    # Once more: the first replaced run is kept (item 5), the second goes to replaced.2.
    proc = _env_run(cfg, "output.overwrite=true", "train.resume=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (exp / "replaced.1" / "summary.json").is_file() and (exp / "replaced.2" / "summary.json").is_file()
    assert cfg.read_bytes() == original


@pytest.mark.distributed
def test_signals_before_and_during_the_loop(make_model, tmp_path):
    model = make_model("llama")
    out = tmp_path / "sig"
    cfg = write_config(tmp_path / "s.yaml", model, out, train={"steps": 6})
    proc = _env_run(cfg, faults="sigterm@0")  # during start-up, before the data is read
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "SIGTERM before the first training step: nothing to save" in proc.stderr
    assert "Traceback" not in proc.stderr and not (out / LOCK).exists()

    proc = _env_run(cfg, faults="sigint@3")  # Ctrl-C: a checkpoint, then exit 75
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "SIGINT: saved" in proc.stderr and "Traceback" not in proc.stderr
    assert (out / "checkpoints" / "step-00000004").is_dir()

    # Inputs changed since the checkpoint: the resume is refused, naming the file.
    data = tmp_path / "data.txt"
    data.write_text(DEMO_TEXT.read_text())
    cfg2 = write_config(tmp_path / "s2.yaml", model, tmp_path / "sig2", train={"steps": 6}, data={"train": str(data)})
    assert _env_run(cfg2, faults="sigterm@2").returncode == 75
    data.write_text(DEMO_TEXT.read_text()[::-1])
    proc = _env_run(cfg2)
    assert proc.returncode == 2 and "inputs changed" in proc.stderr and "data.txt: same size" in proc.stderr


@pytest.mark.distributed
def test_compact_killed_by_sigterm_leaves_no_staging(make_model, tmp_path):
    """SIGTERM while compact writes: its staging directory is removed and --out is not created."""
    from conftest import ROOT

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", make_model("llama"), run, train={"steps": 2})
    assert run_pipeline(cfg).returncode == 0
    out = tmp_path / "compact"
    code = (
        "import os, signal, sys; sys.argv = ['compact', '--run', sys.argv[1], '--out', sys.argv[2]];"
        "import pipeline.export.compact as E; real = E.ShardWriter.close\n"
        "def close(self): real(self); os.kill(os.getpid(), signal.SIGTERM)\n"
        "E.ShardWriter.close = close\n"
        "sys.path.insert(0, 'tools'); import compact; sys.exit(compact.main())"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(run), str(out)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 143 and "SIGTERM: stopped; nothing was published" in proc.stderr, proc.stderr[-3000:]
    assert not out.exists() and not list(tmp_path.glob(".compact.*"))


@pytest.mark.distributed
def test_chaos_walk_runs(tmp_path):
    """tools/chaos.py itself (its quick cases; the whole walk takes minutes): it lists every case and passes."""
    from conftest import ROOT

    tool = [sys.executable, str(ROOT / "tools" / "chaos.py")]
    listed = subprocess.run([*tool, "--list"], capture_output=True, text=True, check=True).stdout.split()
    assert len(listed) >= 20 and "c13_torn_log_line" in listed
    proc = subprocess.run([*tool, "--only", "c1"], capture_output=True, text=True, timeout=900)  # c10-c19
    assert proc.returncode == 0 and "cases passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_a_run_into_a_locked_output_dir_is_refused(make_model, tmp_path, restore_env, capsys):
    from pipeline.run import main

    out = tmp_path / "busy"
    lock = OutputLock.acquire(out)  # this process: alive, as a running run's would be
    (out / "train_log.jsonl").write_text('{"step": 1}\n')
    before = file_tree(out)
    cfg = write_config(tmp_path / "c.yaml", make_model("llama"), out)
    assert main(["--config", str(cfg)]) == 2
    assert "is in use by another run" in capsys.readouterr().err
    assert file_tree(out) == before
    lock.release()
