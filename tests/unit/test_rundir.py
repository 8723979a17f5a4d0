"""The run directory never loses a run and never silently mixes inputs (issue 17): the resolved config's
own name, the output.dir lock, output.overwrite keeping the finished run until the new one finishes,
fingerprints of the base and the data, strict JSON, and the signals that stop a run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import DEMO_TEXT, strict_json, write_config
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
from pipeline.train.rundir import check_output_dir, promote

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
    assert strict_json((tmp_path / "summary.json").read_text()) == {
        "eval_ppl_before": None,
        "x": [1.0, None],
        "ok": 2.5,
    }


def test_torn_last_log_line_is_dropped(tmp_path, capsys):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in log_rows(log)] == [1, 2]
    assert "torn last line 3" in capsys.readouterr().err
    log.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(CheckpointError, match=r"train_log.jsonl:2: not a JSON row"):
        log_rows(log)


def test_a_stale_latest_pointer_does_not_pick_an_older_checkpoint(tmp_path, capsys):
    from synthetic_runs import fake_checkpoint

    root = tmp_path / "out" / "checkpoints"
    fake_checkpoint(root, 2)
    newest = fake_checkpoint(root, 4)
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
