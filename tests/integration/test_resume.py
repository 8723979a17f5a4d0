"""Runs that survive faults: SIGKILL and SIGTERM mid-run, truncated checkpoints, NaN losses.

Faults are real (signals from pipeline/train/faults.py at a chosen step); every comparison with the
uninterrupted run is bitwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, STATEFUL_SECTIONS, file_tree, free_port, read_summary, run_pipeline, write_config
from safetensors.torch import load_file
from synthetic_runs import fake_checkpoint

from pipeline.train.checkpoint import verify

# Structured pruning decisions, adapter-rank removals and rank dropout all straddle the fault steps,
# so a resume that lost masks, scores, rank state, optimizer or RNG state would show.
SECTIONS = STATEFUL_SECTIONS


def _config(tmp: Path, model: Path, out: Path, **train: object) -> Path:
    sections = {**SECTIONS, "train": {**SECTIONS["train"], **train}}
    return write_config(tmp / f"{out.name}.yaml", model, out, **sections)


def _faults(spec: str) -> dict[str, str]:
    return {"PIPELINE_FAULTS": spec}


def _run(cfg: Path, *overrides: str, ranks: int = 2, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        return run_pipeline(cfg, *overrides, ranks=ranks)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _losses(out: Path) -> list[float]:
    return [json.loads(r)["loss"] for r in (out / "train_log.jsonl").read_text().splitlines()]


def _assert_same_run(out: Path, ref: Path) -> None:
    for name in ("masks.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(ref / name)), load_file(str(out / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs from the uninterrupted run"
    assert _losses(out) == _losses(ref)  # bitwise: floats written with repr
    s, r = read_summary(out), read_summary(ref)
    for key in ("decision_steps", "score_events", "kept_heads_per_layer", "adapter_ranks", "eval_loss_after"):
        assert s[key] == r[key], key


@pytest.fixture(scope="module")
def reference(make_model, tmp_path_factory) -> tuple[Path, Path]:
    """The uninterrupted 2-rank run (no checkpoints written: saving must not perturb anything)."""
    tmp = tmp_path_factory.mktemp("ref")
    model = make_model("llama")
    out = tmp / "ref"
    proc = _run(_config(tmp, model, out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(_losses(out)) == 12 and not (out / "checkpoints").exists()
    return model, out


def _bare_rank(rank: int, port: str, cfg: Path, env: dict[str, str]) -> subprocess.Popen:
    """One rank started without a launcher (as a scheduler would), so nothing but the pipeline
    itself can notice that its peer died."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PMI_RANK", "OMPI_COMM_WORLD_RANK")
    base = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    dist = dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    full = {**base, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **dist, **env}
    cmd = [sys.executable, str(ROOT / "pipeline" / "run.py"), "--config", str(cfg)]
    return subprocess.Popen(cmd, cwd=ROOT, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.distributed
def test_rank_killed_between_checkpoints_resumes_exactly(reference, tmp_path):
    model, ref = reference
    out = tmp_path / "killed"
    cfg = _config(tmp_path, model, out, save_every=3)
    # Rank 1 dies at the end of step 7 (checkpoints at 3 and 6): rank 0 must fail, not hang.
    env = {**_faults("sigkill@7:1"), "DEEPSPEED_TIMEOUT": "2"}
    port = str(free_port())
    procs = [_bare_rank(r, port, cfg, env) for r in (0, 1)]
    outs = [p.communicate(timeout=400) for p in procs]
    assert procs[1].returncode == -9
    assert procs[0].returncode not in (0, None), "rank 0 kept going without its peer"
    assert "summary.json" not in os.listdir(out)
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-00000003", "step-00000006"]
    assert len(_losses(out)) == 7  # it logged past the checkpoint
    assert "Connection" in outs[0][1] or "timed out" in outs[0][1], outs[0][1][-2000:]  # and said why it stopped

    proc = _run(cfg)  # the same command again: train.resume=auto
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr and "step-00000006 at step 6 of 12" in proc.stderr
    _assert_same_run(out, ref)
    # keep_last=2: 3 went once 9 was complete
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step-00000006", "step-00000009"]


@pytest.mark.distributed
def test_sigterm_saves_and_a_truncated_newest_checkpoint_is_skipped(reference, tmp_path):
    model, ref = reference
    out = tmp_path / "term"
    cfg = _config(tmp_path, model, out, save_every=3)
    # SIGTERM reaches rank 0 only, during step 4: both ranks agree at step 5's all-reduce, save 5, exit 75.
    proc = _run(cfg, env=_faults("sigterm@4:0"))
    assert proc.returncode == 75, proc.stderr[-4000:]
    assert "SIGTERM: saved" in proc.stderr and "step-00000005" in proc.stderr
    newest = out / "checkpoints" / "step-00000005"
    assert verify(newest) is None and (out / "checkpoints" / "latest").read_text().strip() == newest.name

    # A different world size or config is refused before any heavy work, naming what to do.
    one = _run(cfg, "pruning.target_sparsity=0.3", ranks=1)
    assert one.returncode == 2 and "written by 2 ranks; this run has 1" in one.stderr
    assert "relaunch with 2 ranks" in one.stderr and "pruning.target_sparsity: 0.5 -> 0.3" in one.stderr

    # Truncate the newest checkpoint (killed mid-copy, disk full): resume falls back to step 3.
    optim = next((newest / "engine").glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])
    assert "truncated" in verify(newest)
    proc = _run(cfg)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "skipping checkpoint" in proc.stderr and "step-00000005" in proc.stderr
    assert "step-00000003 at step 3 of 12" in proc.stderr
    assert (out / "checkpoints" / ".superseded-step-00000005").is_dir()  # set aside, not deleted
    _assert_same_run(out, ref)


def test_nan_steps_are_skipped_then_the_run_stops(make_model, tmp_path):
    model = make_model("llama")
    out = tmp_path / "nan"
    cfg = write_config(tmp_path / "nan.yaml", model, out, train={"steps": 6, "max_bad_steps": 3})
    proc = _run(cfg, ranks=1, env=_faults("nan@3,nan@5"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step 3: non-finite loss or gradient" in proc.stderr and "(2 of train.max_bad_steps=3)" in proc.stderr
    s = read_summary(out)
    assert s["bad_steps"] == [3, 5] and s["skipped_score_events"] == 0  # their scores were never taken
    masks = load_file(str(out / "masks.safetensors"))
    assert s["achieved_sparsity"] == pytest.approx(0.5, abs=0.05) and all(
        torch.isfinite(m).all() for m in masks.values()
    )
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "adapter" / "adapter_model.safetensors")).values())

    out2 = tmp_path / "nan2"
    cfg = write_config(tmp_path / "nan2.yaml", model, out2, train={"steps": 4, "save_every": 1, "max_bad_steps": 1})
    proc = _run(cfg, ranks=1, env=_faults("nan@3"))
    assert proc.returncode == 3 and "1 steps with a non-finite loss or gradient (steps [3])" in proc.stderr
    assert "train.max_bad_steps=1" in proc.stderr
    ckpts = out2 / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000002" and verify(ckpts / "step-00000002") is None


def test_a_finished_run_is_never_overwritten(reference):
    _, ref = reference
    before = file_tree(ref)
    proc = _run(ref.parent / "ref.yaml", ranks=1)
    assert (
        proc.returncode == 2
        and "already holds a finished run" in proc.stderr
        and "output.overwrite=true" in proc.stderr
    )
    assert file_tree(ref) == before


# ---------------------------------------------------------------------------------------------
# Bad input: a clear message naming the key or file, before any heavy work, and nothing written.


def _earlier_run(out: Path, finished: bool) -> None:
    """What an earlier run left: outputs and a checkpoint (contents do not matter, only that they survive)."""
    (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    (out / "checkpoints" / "step-00000002" / "state.json").write_text('{"step": 2}')
    (out / "checkpoints" / "latest").write_text("step-00000002\n")
    (out / "masks.safetensors").write_bytes(b"earlier masks")
    if finished:
        (out / "summary.json").write_text('{"earlier": true}')


def _bad_inputs(tmp: Path, model: Path) -> list[tuple[str, list[str], str]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    d = tmp / "inputs"
    d.mkdir()
    (d / "empty.txt").write_text("")
    (d / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    (d / "nofield.jsonl").write_text('{"body": "hello"}\n' * 50)
    (d / "short.txt").write_text("hi")
    (d / "batch.json").write_text('{"train_batch_size": 7, "zero_optimization": {"stage": 3}}')
    (d / "auto.json").write_text('{"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}')
    (d / "noconfig").mkdir()
    (d / "noweights").mkdir()
    (model / "config.json").is_file() and (d / "noweights" / "config.json").write_text(
        (model / "config.json").read_text()
    )
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(d / "gpt2")
    return [
        ("pruning.scop=global", [], "unknown key pruning.scop (did you mean pruning.scope?)"),
        ("train.stepz=3", [], "did you mean train.steps?"),
        ("pruning.target_sparsity=1.0", [], "pruning.target_sparsity=1.0: must be in [0, 1)"),
        ("train.keep_last=0", [], "train.keep_last=0: must be >= 1"),
        (
            f"deepspeed.config={d / 'batch.json'}",
            [],
            "train_batch_size=7 but train.micro_batch_size x train.grad_accum",
        ),
        (f"deepspeed.config={d / 'auto.json'}", [], 'zero_optimization.reduce_bucket_size="auto" cannot be resolved'),
        (f"model.path={d / 'noconfig'}", [], "noconfig: no config.json"),
        (f"model.path={d / 'noweights'}", [], "noweights: no weights"),
        (f"model.path={d / 'gpt2'}", [], "model type 'gpt2': config lacks ['intermediate_size']"),
        (f"data.train={d / 'empty.txt'}", [], "empty.txt: file is empty"),
        (f"data.train={d / 'latin1.txt'}", [], "latin1.txt: not valid UTF-8"),
        (f"data.train={d / 'nofield.jsonl'}", [], "no field 'text' (fields: ['body']); set data.text_field"),
        (f"data.train={d / 'short.txt'}", [], "fewer than one sequence of data.seq_len=32"),
        (f"train.resume={d / 'nowhere'}", [], "no complete checkpoint found there"),
    ]


def test_bad_input_is_refused_clearly_and_earlier_outputs_survive(make_model, tmp_path, restore_env, capsys):
    from pipeline.run import main

    model = make_model("llama")
    out = tmp_path / "out"
    _earlier_run(out, finished=True)
    before = file_tree(out)
    cfg = write_config(tmp_path / "c.yaml", model, out, output={"dir": str(out), "overwrite": True})
    for override, _, message in _bad_inputs(tmp_path, model):
        assert main(["--config", str(cfg), override]) == 2, override
        err = capsys.readouterr().err
        assert message in err, f"{override}: {err[-2000:]}"
        assert file_tree(out) == before, f"{override} touched {out}"

    # An unfinished run's checkpoints are not started over by accident.
    unfinished = tmp_path / "unfinished"
    _earlier_run(unfinished, finished=False)
    before = file_tree(unfinished)
    cfg = write_config(tmp_path / "u.yaml", model, unfinished)
    assert main(["--config", str(cfg), "train.resume=none"]) == 2
    err = capsys.readouterr().err
    assert "holds checkpoints of an unfinished run (newest: step-00000002)" in err and "train.resume=auto" in err
    assert file_tree(unfinished) == before


def test_checkpoint_choice_skips_every_kind_of_broken_one(tmp_path, capsys):
    from pipeline.train.checkpoint import CheckpointError, find_checkpoint, start_fresh

    root = tmp_path / "out" / "checkpoints"
    good = fake_checkpoint(root, 2)
    flipped = fake_checkpoint(root, 4)  # same size, one byte changed
    data = bytearray((flipped / "engine" / "optim.pt").read_bytes())
    data[100] ^= 1
    (flipped / "engine" / "optim.pt").write_bytes(bytes(data))
    unfinished = fake_checkpoint(root, 6)  # killed before its manifest
    (unfinished / "manifest.json").unlink()
    missing = fake_checkpoint(root, 8)
    (missing / "pruning.safetensors").unlink()
    fake_checkpoint(root, 10).rename(root / ".partial-step-00000010")  # never renamed: not a candidate
    (root / "latest").write_text("step-00000008\n")
    assert find_checkpoint(tmp_path / "out", explicit=False) == good
    err = capsys.readouterr().err
    for name, why in (("8", "pruning.safetensors is missing"), ("6", "no manifest.json"), ("4", "SHA-256")):
        assert f"step-0000000{name}: " in err and why in err
    with pytest.raises(CheckpointError, match="incomplete or corrupt: .*SHA-256"):
        find_checkpoint(flipped, explicit=True)

    # output.overwrite=true over a finished run: its checkpoints and summary are kept aside, not deleted.
    (tmp_path / "out" / "summary.json").write_text("{}")
    start_fresh(tmp_path / "out")
    assert (tmp_path / "out" / "checkpoints.replaced.1" / "step-00000002").is_dir()
    assert not root.exists() and (tmp_path / "out" / "summary.replaced.json.1").exists()
