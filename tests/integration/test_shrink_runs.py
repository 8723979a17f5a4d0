"""Shrink in flight (pruning.shrink): 2-rank ZeRO-3 runs over an NF4 base (tied embeddings) that cut the
pruned units out of the model mid-run, against the run that stayed masked; resume across a shrink; ranks
that disagree; the export of a shrunk run.

With dense columns nothing is re-quantized, so the shrunk run is the masked run up to fp32 rounding (the
cut matmuls sum fewer zeros); with re-quantized columns it is within the measured effect of re-quantizing.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO_VALID, ROOT, STATEFUL_SECTIONS, read_summary, run_pipeline, write_config
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

STEPS = 10  # decisions at 4, 6 and 8 (warmup 0.2, cooldown 0.2, every 2); nothing scored after 8
SECTIONS = {**STATEFUL_SECTIONS, "train": {**STATEFUL_SECTIONS["train"], "steps": STEPS}}
RUNS = {  # name -> pruning.shrink, pruning.shrink_columns
    "masked": ("off", "requantize"),
    "final_dense": ("final", "dense"),
    "every": ("every_decision", "dense"),
    "requant": ("final", "requantize"),
}


def _config(tmp: Path, model: Path, name: str, **pruning: object) -> tuple[Path, Path]:
    out = tmp / name
    sections = {**SECTIONS, "pruning": {**SECTIONS["pruning"], **pruning}}
    return write_config(tmp / f"{name}.yaml", model, out, **sections), out


def _run(cfg: Path, faults: str = "") -> subprocess.CompletedProcess:
    old = os.environ.get("PIPELINE_FAULTS")
    os.environ["PIPELINE_FAULTS"] = faults
    try:
        return run_pipeline(cfg, ranks=2)
    finally:
        os.environ.pop("PIPELINE_FAULTS") if old is None else os.environ.__setitem__("PIPELINE_FAULTS", old)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, f"tools/{name}", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def _losses(out: Path) -> list[float]:
    return [json.loads(r)["loss"] for r in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(make_model, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("shrink")
    model = make_model("llama", tied=True)
    out = {}
    for name, (shrink, columns) in RUNS.items():
        cfg, out[name] = _config(tmp, model, name, shrink=shrink, shrink_columns=columns)
        _ok(_run(cfg))
    return out


def test_shrunk_run_is_the_masked_run(runs):
    """shrink: final with dense columns: the same run until the cut after step 8 (scores and masks included,
    since nothing is scored after the final decision), then the masked run's losses and final eval to fp32
    rounding (the cut matmuls only sum fewer zeros)."""
    masked, final = runs["masked"], runs["final_dense"]
    s, m = read_summary(final), read_summary(masked)
    assert s["shrink"]["steps"] == [8] and m["shrink"]["steps"] == []
    assert _losses(final)[:8] == _losses(masked)[:8]
    torch.testing.assert_close(torch.tensor(_losses(final)), torch.tensor(_losses(masked)), rtol=1e-5, atol=0)
    assert abs(s["eval_loss_after"] - m["eval_loss_after"]) <= 1e-5 * m["eval_loss_after"]
    for name in ("scores.safetensors", "masks.safetensors"):
        a, b = load_file(str(masked / name)), load_file(str(final / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert s["perf"]["trainable_params"] < m["perf"]["trainable_params"]
    assert s["perf"]["memory_after_shrink"]["probe_step"] == 10 and "memory_after_shrink" not in m["perf"]
    assert not (masked / "shrink.safetensors").exists()


def test_every_decision_cuts_at_each_decision(runs):
    """Each decision cuts the model: the masked run's losses until the second decision (its scores, after the
    first cut, are normalised over the units still in the model, so later decisions may differ), the target
    reached, each cut recorded."""
    masked, every = runs["masked"], runs["every"]
    s, m = read_summary(every), read_summary(masked)
    assert s["shrink"]["steps"] == s["decision_steps"] == [4, 6, 8]
    torch.testing.assert_close(torch.tensor(_losses(every)[:6]), torch.tensor(_losses(masked)[:6]), rtol=1e-5, atol=0)
    assert s["achieved_sparsity"] == pytest.approx(m["achieved_sparsity"], abs=0.02)
    hist = load_file(str(every / "shrink.safetensors"))
    assert [int(hist[f"shrink.{e}.step"]) for e in range(3)] == [4, 6, 8]
    kept = [hist[f"shrink.{e}.0.ch"] for e in range(3)]  # layer 0's channels: each cut keeps a subset
    assert all(set(b.tolist()) <= set(a.tolist()) for a, b in itertools.pairwise(kept))


def test_requantized_shrink_is_within_its_effect(runs):
    """shrink: final with re-quantized o/down columns: identical up to the cut, within the measured effect
    of re-quantizing after it (on vimdoc-llama-7m: docs/BENCHMARKS.md)."""
    masked, req = _losses(runs["masked"]), _losses(runs["requant"])
    assert req[:8] == masked[:8]  # the same run until the cut after step 8 (bitwise)
    for name in ("scores.safetensors", "masks.safetensors"):  # scoring ends at the final decision, the cut
        a, b = load_file(str(runs["masked"] / name)), load_file(str(runs["requant"] / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    torch.testing.assert_close(torch.tensor(req[8:]), torch.tensor(masked[8:]), rtol=0.02, atol=0)
    s, m = read_summary(runs["requant"]), read_summary(runs["masked"])
    assert s["shrink"]["steps"] == [8] and s["shrink"]["columns"] == "requantize"
    # The cut model holds less than the whole one; the tied embedding stays one tensor (a copy would add 128 KB).
    held = s["perf"]["memory"]["resident_by_kind_mb"]["model"]
    assert s["perf"]["memory_after_shrink"]["resident_by_kind_mb"]["model"] < held
    assert s["eval_loss_after"] != m["eval_loss_after"]
    assert abs(s["eval_loss_after"] - m["eval_loss_after"]) <= 0.01 * m["eval_loss_after"]


@pytest.mark.parametrize("name", ["every", "requant"])
def test_export_is_the_model_that_trained(runs, tmp_path, name):
    """compact --verify against the cut model, and the export's held-out loss is the run's own final eval."""
    out = tmp_path / "export"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "tools/compact.py", "--run", str(runs[name]), "--out", str(out)]
    proc = subprocess.run(
        [*cmd, "--merge-into", "dequantized", "--verify"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "compact vs masked logits" in proc.stdout
    report = out.parent / "eval.json"
    cmd = [sys.executable, "tools/evaluate.py", "--model", str(out), "--text", str(DEMO_VALID), "--seq-len", "32"]
    proc = subprocess.run(
        [*cmd, "--max-tokens", "512", "--repeats", "1", "--json", str(report)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    loss = json.loads(report.read_text())[str(out)]["loss"]
    assert abs(loss - read_summary(runs[name])["eval_loss_after"]) <= 1e-4 * loss


def test_resume_before_and_after_a_shrink(runs, make_model, tmp_path):
    """SIGTERM in step 2 (checkpoint at 3, before the first cut at 4), resume, SIGTERM in step 5 (checkpoint
    at 6, after two cuts), resume: the run is bitwise the uninterrupted one; the checkpoint after the cuts
    holds the smaller state."""
    cfg, out = _config(
        tmp_path, make_model("llama", tied=True), "every", shrink="every_decision", shrink_columns="dense"
    )
    for faults in ("sigterm@2", "sigterm@5"):
        proc = _run(cfg, faults)
        assert proc.returncode == 75, proc.stderr[-3000:]
    engine = next((out / "checkpoints" / "step-00000006" / "engine").rglob("*model_states.pt"))
    shapes = {k: v for group in torch.load(engine, weights_only=False)["param_shapes"] for k, v in group.items()}
    a = next(v for k, v in shapes.items() if "layers.0.mlp.down_proj.lora_A" in k)
    assert a[1] < 96  # the down_proj adapter was cut with the channels
    assert not load_file(str(out / "checkpoints" / "step-00000003" / "pruning.safetensors")).keys() & {"shrink.0.step"}
    _ok(_run(cfg))
    ref = runs["every"]
    assert _losses(out) == _losses(ref)
    for name in ("masks.safetensors", "adapter/adapter_model.safetensors", "shrink.safetensors"):
        x, y = load_file(str(ref / name)), load_file(str(out / name))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    assert read_summary(out)["eval_loss_after"] == read_summary(ref)["eval_loss_after"]


def test_ranks_that_disagree_on_a_shrink_stop(make_model, tmp_path):
    cfg, out = _config(tmp_path, make_model("llama", tied=True), "disagree", shrink="final")
    proc = _run(cfg, "noshrink@8:1")
    assert proc.returncode not in (0, 75)
    assert "1 of 2 ranks would shrink the model; the ranks must agree" in proc.stdout + proc.stderr
    assert not (out / "summary.json").exists()
