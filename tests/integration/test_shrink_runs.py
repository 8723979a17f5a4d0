"""Shrink in flight (pruning.shrink): 2-rank ZeRO-3 runs over an NF4 base that cut the pruned units out of
the model mid-run, against the run that stayed masked; resume across a shrink; ranks that disagree; the
export of a shrunk run.

With dense columns nothing is re-quantized, so the shrunk run is the masked run up to fp32 rounding (the
cut matmuls sum fewer zeros); with re-quantized columns it is within the measured effect of re-quantizing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO_VALID, ROOT, read_summary, run_pipeline, write_config
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

STEPS = 10  # decisions at 4, 6 and 8 (warmup 0.2, cooldown 0.2, every 2); nothing scored after 8
SECTIONS = dict(
    train={"steps": STEPS, "micro_batch_size": 2, "grad_accum": 2, "lr": 0.01},
    # Adapter-rank pruning and rank dropout run across the shrinks too.
    lora={
        "r": 4,
        "alpha": 8,
        "rank_dropout": 0.2,
        "rank_pruning": {"enabled": True, "init_r": 6, "target_r": 3, "every": 2, "warmup": 0.1, "cooldown": 0.3},
    },
    pruning={"target_sparsity": 0.5, "prune_every": 2, "warmup": 0.2, "cooldown": 0.2},
)
RUNS = {  # name -> pruning.shrink, pruning.shrink_columns
    "masked": ("off", "requantize"),
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
    model = make_model("llama")
    out = {}
    for name, (shrink, columns) in RUNS.items():
        cfg, out[name] = _config(tmp, model, name, shrink=shrink, shrink_columns=columns)
        _ok(_run(cfg))
    return out


def test_shrunk_run_is_the_masked_run(runs):
    """Every decision cuts the model (dense columns): losses, masks and the final eval are the masked run's
    to fp32 rounding, and each cut shows in the trainable parameters. (Scores after a cut are normalised over
    the units still in the model, so they are not compared: the final-mode test compares them.)"""
    masked, every = runs["masked"], runs["every"]
    s, m = read_summary(every), read_summary(masked)
    assert s["shrink"]["steps"] == s["decision_steps"] == [4, 6, 8] and m["shrink"]["steps"] == []
    torch.testing.assert_close(torch.tensor(_losses(every)), torch.tensor(_losses(masked)), rtol=1e-5, atol=0)
    assert abs(s["eval_loss_after"] - m["eval_loss_after"]) <= 1e-5 * m["eval_loss_after"]
    ma, mb = load_file(str(masked / "masks.safetensors")), load_file(str(every / "masks.safetensors"))
    assert torch.equal(ma["heads"], mb["heads"]) and torch.equal(ma["channels"], mb["channels"])
    assert s["kept_heads_per_layer"] == m["kept_heads_per_layer"]
    assert s["perf"]["trainable_params"] < m["perf"]["trainable_params"]
    assert s["perf"]["memory_after_shrink"]["probe_step"] == 10 and "memory_after_shrink" not in m["perf"]
    hist = load_file(str(every / "shrink.safetensors"))
    assert [int(hist[f"shrink.{e}.step"]) for e in range(3)] == [4, 6, 8] and not (
        masked / "shrink.safetensors"
    ).exists()


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
    cfg, out = _config(tmp_path, make_model("llama"), "every", shrink="every_decision", shrink_columns="dense")
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
    cfg, out = _config(tmp_path, make_model("llama"), "disagree", shrink="final")
    proc = _run(cfg, "noshrink@8:1")
    assert proc.returncode not in (0, 75)
    assert "1 of 2 ranks would shrink the model; the ranks must agree" in proc.stdout + proc.stderr
    assert not (out / "summary.json").exists()
