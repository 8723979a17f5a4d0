"""tools/compact.py: the compact model computes what the masked model computed, loads, and counts right.

Most run directories are built synthetically (a PEFT adapter with non-zero B, hand-made masks, a
config.yaml and a summary.json); one test compacts the output of the real pipeline CLI.
"""

from __future__ import annotations

import re
import subprocess
import sys

import torch
from conftest import ROOT, read_summary, run_pipeline, write_config
from transformers import AutoModelForCausalLM

from pipeline.export.compact import (
    export,
    load_run,
)

INTER = 96  # the conftest tiny models' intermediate_size


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_real_pipeline_run_compacts_and_verifies(make_model, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", make_model("qwen2"), run, pruning={"target_sparsity": 0.4})
    proc = run_pipeline(cfg)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = read_summary(run)
    out = tmp_path / "compact"
    cmd = [sys.executable, str(ROOT / "tools" / "compact.py"), "--run", str(run), "--out", str(out)]
    cmd += ["--merge-into", "dequantized", "--verify", "--verify-samples", "2", "--speed-repeats", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "compact vs masked logits" in proc.stdout and "forward tokens/s" in proc.stdout
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=(out / "modeling_decilm.py").exists())
    base = AutoModelForCausalLM.from_pretrained(make_model("qwen2"))
    real = int(re.search(r"-> ([\d,]+) real", proc.stdout)[1].replace(",", ""))
    assert n_params(base) - real == summary["pruned_params"] and n_params(model) >= real
    assert "## Verification" in (out / "README.md").read_text()


def test_width_rules_give_a_padding_free_export(make_model, tmp_path):
    """pruning.round_to and pruning.kv_heads_multiple_of on a real run: every layer keeps the same
    KV heads (so the nemotron-nas export has no zero heads) and a multiple of 16 channels."""
    model_dir = make_model("qwen2")
    run = tmp_path / "run"
    rules = {"target_sparsity": 0.4, "round_to": 16, "kv_heads_multiple_of": 2}
    proc = run_pipeline(write_config(tmp_path / "cfg.yaml", model_dir, run, pruning=rules))
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = read_summary(run)
    assert len(set(summary["kept_kv_heads_per_layer"])) == 1 and summary["kept_kv_heads_per_layer"][0] % 2 == 0
    assert all(c % 16 == 0 or c == INTER for c in summary["kept_channels_per_layer"])
    result = export(load_run(run), tmp_path / "compact", merge_into="dequantized", log=lambda _: None)
    assert result.padding_params == 0 and result.params_real == result.params_after
    # Infeasible at the target: refused before training, naming the key.
    refused = run_pipeline(
        write_config(
            tmp_path / "bad.yaml",
            model_dir,
            tmp_path / "bad",
            pruning={"target_sparsity": 0.8, "kv_heads_multiple_of": 4},
        )
    )
    assert refused.returncode == 2 and "pruning.kv_heads_multiple_of=4: every layer keeps 4 of 4" in refused.stderr
    assert not (tmp_path / "bad" / "summary.json").exists()
