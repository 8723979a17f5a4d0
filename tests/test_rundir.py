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
from conftest import DEMO_TEXT, file_tree, read_summary, run_pipeline, write_config
from safetensors.torch import load_file, save_file

from pipeline.config.schema import ConfigError, config_from_dict, load_config
from pipeline.model.fingerprint import compare, model_fingerprint, run_fingerprints
from pipeline.train.checkpoint import (
    RUN_CONFIG,
    CheckpointError,
    OutputError,
    check_resumable,
    find_checkpoint,
    start_fresh,
    write_summary,
)
from pipeline.train.logs import log_rows
from pipeline.train.rundir import LOCK, OutputLock, check_output_dir, clean_stale_staging, promote


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _strict(text: str) -> object:
    def bad(c: str) -> None:
        raise ValueError(f"non-standard JSON constant {c}")

    return json.loads(text, parse_constant=bad)


# ------------------------------------------------------------------------------------------ config


def test_output_dir_empty_refused_and_home_expanded(make_model):
    base = {"model": {"path": "m"}, "data": {"train": "t.txt"}}
    with pytest.raises(ConfigError, match="output.dir is empty"):
        config_from_dict({**base, "output": {"dir": ""}})
    cfg = config_from_dict({**base, "output": {"dir": "~/x"}})
    assert cfg.output.dir == str(Path.home() / "x")


def test_config_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_output_dir_that_is_a_file_or_under_one(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for d, why in ((f, "is a file"), (f / "sub" / "run", f"is under {f}, which is a file")):
        cfg = config_from_dict({"model": {"path": "m"}, "data": {"train": "t"}, "output": {"dir": str(d)}})
        with pytest.raises(OutputError, match=why):
            check_output_dir(cfg)


def test_input_config_in_output_dir_is_never_overwritten(make_model, tmp_path, restore_env, capsys):
    from pipeline.run import main

    out = tmp_path / "exp"
    out.mkdir()
    cfg = write_config(out / RUN_CONFIG, make_model("llama"), out)
    before = cfg.read_bytes()
    assert main(["--config", str(cfg), "pruning.target_sparsity=0.3"]) == 2
    assert "is the file this run writes its resolved config to" in capsys.readouterr().err
    assert cfg.read_bytes() == before


# -------------------------------------------------------------------------------------------- lock


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


# ------------------------------------------------------------------------------------ replacement


def test_start_fresh_twice_keeps_both_earlier_checkpoint_sets(tmp_path):
    out = tmp_path / "out"
    for n in (1, 2):
        (out / "checkpoints" / f"step-0000000{n}").mkdir(parents=True)
        start_fresh(out)
    assert (out / "checkpoints.replaced.1" / "step-00000001").is_dir()
    assert (out / "checkpoints.replaced.2" / "step-00000002").is_dir()


def test_promote_moves_the_earlier_run_whole(tmp_path):
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "a").write_text("old adapter")
    for name in ("summary.json", "masks.safetensors", "train_log.jsonl", RUN_CONFIG):
        (out / name).write_text(f"old {name}")
    (out / "notes.md").write_text("the user's own")  # not the run's: stays
    work = out / ".incoming"
    (work / "adapter").mkdir(parents=True)
    (work / "adapter" / "a").write_text("new adapter")
    for name in ("summary.json", "masks.safetensors", RUN_CONFIG):
        (work / name).write_text(f"new {name}")
    aside = promote(work, out)
    assert aside == out / "replaced.1" and not work.exists()
    assert (aside / "train_log.jsonl").read_text() == "old train_log.jsonl"  # the earlier run is whole
    assert (aside / "adapter" / "a").read_text() == "old adapter"
    assert (out / "summary.json").read_text() == "new summary.json" and not (out / "train_log.jsonl").exists()
    assert (out / "notes.md").read_text() == "the user's own"


def test_a_finished_but_unmoved_replacement_is_completed_first(tmp_path):
    from pipeline.train.rundir import prepare_output

    out = tmp_path / "out"
    (out / ".incoming").mkdir(parents=True)
    (out / "summary.json").write_text("first")
    (out / ".incoming" / "summary.json").write_text("second")  # killed between its summary and the move
    cfg = config_from_dict(
        {"model": {"path": "m"}, "data": {"train": "t"}, "output": {"dir": str(out), "overwrite": True}}
    )
    work, lock = prepare_output(cfg)
    lock.release()
    assert (out / "summary.json").read_text() == "second" and (
        out / "replaced.1" / "summary.json"
    ).read_text() == "first"
    assert work == out / ".incoming"


# ---------------------------------------------------------------------------------- compact staging


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


# ---------------------------------------------------------------------------------- fingerprints


def test_fingerprint_sees_same_shape_other_weights_and_changed_data(make_model, tmp_path):
    src = make_model("llama")
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in src.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert model_fingerprint(copy) == model_fingerprint(src)
    w = load_file(copy / "model.safetensors")
    k = next(iter(w))
    w[k] = w[k] + 1e-3  # same names, shapes and dtypes
    save_file(w, copy / "model.safetensors", metadata={"format": "pt"})
    assert compare({"base": model_fingerprint(src)}, {"base": model_fingerprint(copy)}) == [
        "base model model.safetensors: same size, different content"
    ]

    data = tmp_path / "train.txt"
    data.write_text(DEMO_TEXT.read_text())
    cfg = config_from_dict({"model": {"path": str(src)}, "data": {"train": str(data)}})
    old = run_fingerprints(src, cfg.data)
    data.write_text(DEMO_TEXT.read_text()[:-10])
    assert compare(old, run_fingerprints(src, cfg.data)) == [
        f"data.train ({data}): train.txt: {len(DEMO_TEXT.read_bytes())} bytes, now {len(DEMO_TEXT.read_bytes()) - 10}"
    ]


def test_resume_refuses_changed_inputs_naming_them(make_model, tmp_path):
    src = make_model("llama")
    data = tmp_path / "train.txt"
    data.write_text(DEMO_TEXT.read_text())
    cfg = config_from_dict({"model": {"path": str(src)}, "data": {"train": str(data)}})
    ckpt = tmp_path / "step-00000002"
    ckpt.mkdir()
    state = {"step": 2, "world_size": 1, "config": cfg.to_dict(), "fingerprints": run_fingerprints(src, cfg.data)}
    (ckpt / "state.json").write_text(json.dumps(state))
    assert check_resumable(ckpt, cfg, 1, run_fingerprints(src, cfg.data))["step"] == 2
    data.write_text(DEMO_TEXT.read_text().replace("the", "teh"))
    with pytest.raises(CheckpointError, match=r"inputs changed .*data.train .*train.txt: .*restore the original"):
        check_resumable(ckpt, cfg, 1, run_fingerprints(src, cfg.data))


# ----------------------------------------------------------------------------------- logs and JSON


def test_nan_is_written_as_null(tmp_path):
    write_summary(tmp_path, {"eval_ppl_before": float("nan"), "x": [1.0, float("inf")], "ok": 2.5})
    assert _strict((tmp_path / "summary.json").read_text()) == {"eval_ppl_before": None, "x": [1.0, None], "ok": 2.5}


def test_torn_last_log_line_is_dropped(tmp_path, capsys):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in log_rows(log)] == [1, 2]
    assert "torn last line 3" in capsys.readouterr().err
    log.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(CheckpointError, match=r"train_log.jsonl:2: not a JSON row"):
        log_rows(log)


def test_a_stale_latest_pointer_does_not_pick_an_older_checkpoint(tmp_path, capsys):
    from test_resume import _fake_checkpoint

    root = tmp_path / "out" / "checkpoints"
    _fake_checkpoint(root, 2)
    newest = _fake_checkpoint(root, 4)
    (root / "latest").write_text("step-00000002\n")
    assert find_checkpoint(tmp_path / "out", explicit=False) == newest
    assert "ignoring it" in capsys.readouterr().err


def test_malformed_fault_spec_is_refused(restore_env, make_model, tmp_path, capsys):
    from pipeline.run import main

    os.environ["PIPELINE_FAULTS"] = "sigterm@x,boom@3"
    cfg = write_config(tmp_path / "c.yaml", make_model("llama"), tmp_path / "out")
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "'sigterm@x' is not KIND@STEP[:RANK]" in err and "'boom@3': kind must be one of" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- real runs (processes)


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
    assert _strict((exp / "summary.json").read_text()) and summary["fingerprints"]["base"]
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
    from test_compact import ROOT

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
