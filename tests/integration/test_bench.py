"""tools/bench.py end to end in a minimal setting: tiny random model, 2 steps, one sparsity, two criteria.

Keeps the benchmark working; it times nothing (the figures of a tiny model on a shared CI machine
mean nothing), it checks that every table is filled with sane values and every file is written.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from conftest import DEMO_TEXT, DEMO_VALID, ROOT

pytestmark = pytest.mark.distributed  # starts training processes


def test_bench_minimal(make_model, tmp_path):
    out = tmp_path / "bench"
    cmd = [
        sys.executable,
        str(ROOT / "tools" / "bench.py"),
        "--model",
        str(make_model("llama")),
        "--train",
        str(DEMO_TEXT),
        "--eval",
        str(DEMO_VALID),
        "--out",
        str(out),
        "--steps",
        "4",
        "--calib-steps",
        "2",
        "--sparsities",
        "0.5",
        "--criteria",
        "lora,full_grad",
        "--scopes",
        "global",
        "--speed-steps",
        "4",
        "--speed-batch",
        "2",
        "--speed-repeats",
        "2",
        "--no-progress",
        "--set",
        "data.seq_len=32",
        "--set",
        "data.eval_seq_len=64",
        "--set",
        "data.eval_max_tokens=1024",
        "--set",
        "train.micro_batch_size=2",
        "--set",
        "pruning.cooldown=0.25",  # scoring on steps 1-3: step 2 is the memory probe, 3 and 4 are timed
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    results = json.loads((out / "results.json").read_text())
    assert results["failed"] == []
    # dense on both bases; per criterion a pruning run, a one-shot scoring run and a timed pair
    assert set(results["runs"]) == {
        "dense-nf4",
        "dense-none",
        *(f"{kind}-{m}" for kind in ("oneshot", "speed", "speed-plain") for m in ("lora", "full_grad")),
        "prune-lora-global-0.5",
        "prune-full_grad-global-0.5",
    }
    finite = lambda x: isinstance(x, float) and math.isfinite(x) and x > 0  # noqa: E731
    assert {r["method"] for r in results["quality"]} == {"lora", "full_grad"}
    for r in results["quality"]:
        assert r["ok"] and all(finite(r[k]) for k in ("ppl_before", "ppl_oneshot", "ppl_after")), r
        assert r["achieved_sparsity"] == pytest.approx(0.5, abs=0.05)
        assert len(r["kept_channels_per_layer"]) == 2
    assert results["runs"]["prune-full_grad-global-0.5"]["summary"]["quantization"] == "none"
    for q in ("nf4", "none"):
        assert finite(results["dense"][q]["ppl_after"])

    mem = {(r["method"], r["base"]): r for r in results["memory"]}
    assert set(mem) == {("plain LoRA", "nf4"), ("plain LoRA", "none"), ("lora", "nf4"), ("full_grad", "none")}
    for r in mem.values():
        assert finite(r["transient_mb"]) and finite(r["vs_plain"]) and r["model_mb"] > 0
    assert mem[("lora", "nf4")]["scored"] and mem[("full_grad", "none")]["scored"]
    # full_grad materialises a gradient of every projection weight: more transient memory than plain LoRA.
    assert mem[("full_grad", "none")]["transient_mb"] > mem[("plain LoRA", "none")]["transient_mb"]

    assert {r["method"] for r in results["overhead"]} == {"lora", "full_grad"}
    for r in results["overhead"]:
        assert finite(r["overhead_scored_step"]) and finite(r["overhead_run"]) and 0 < r["scored_fraction"] <= 1
    (c,) = results["compact"]
    assert finite(c["speedup"]) and 0 < c["params_ratio"] < 1 and 0 < c["flops_ratio"] < 1
    assert c["ppl_compact"] == pytest.approx(c["ppl_run"], rel=1e-3)  # the compact model computes what was trained
    comm = {r["method"]: r for r in results["communication"]["rows"]}
    # lora all-reduces one float64 per projection row/column group; full_grad every weight gradient.
    assert 0 < comm["lora"]["allreduce_bytes_per_event"] < comm["full_grad"]["allreduce_bytes_per_event"]
    assert finite(comm["lora"]["ratio"])

    report = (out / "report.md").read_text()
    for needle in ("## Quality", "## Memory", "## Speed", "## Communication", "`full_grad`", "speedup"):
        assert needle in report
    for png in ("quality.png", "layers.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000

    # Repeating the command reuses the finished runs and rewrites the report.
    again = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads((out / "results.json").read_text())
    assert {r["status"] for r in rerun["runs"].values()} == {"reused"}
