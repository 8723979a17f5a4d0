"""Bad input that used to give a traceback: one message naming the problem and the fix, exit 2, before
any model is loaded (issue 17)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import write_config
from transformers import AutoConfig

from pipeline.config.schema import ConfigError, PruningConfig
from pipeline.model.structure import structure_from_config
from pipeline.pruning.pruner import check_reachable


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_run_refuses_before_loading(make_model, tmp_path, restore_env, capsys):
    """Each case stops with exit 2 and its message; none reaches weight loading or writes output.dir."""
    from pipeline.run import main

    model = make_model("llama")
    d = tmp_path / "inputs"
    d.mkdir()
    (d / "list.json").write_text("[1, 2]")
    (d / "zero2.json").write_text('{"zero_optimization": {"stage": 2}}')
    (d / "afile").write_text("x")
    trunc = _copy(model, d / "trunc")
    (trunc / "model.safetensors").write_bytes((trunc / "model.safetensors").read_bytes()[:5000])
    badconf = _copy(model, d / "badconf")
    (badconf / "config.json").write_text("{not json")
    out = tmp_path / "out"
    cases = [
        (f"model.path={trunc}", "model.safetensors is truncated"),
        (f"model.path={badconf}", "config.json is not valid JSON"),
        ("model.dtype=fp16", "model.dtype=fp16 without a GPU"),
        (f"deepspeed.config={d / 'list.json'}", "the top level is a JSON list"),
        (f"deepspeed.config={d / 'zero2.json'}", "zero_optimization.stage=2: the pipeline runs on ZeRO-3 only"),
        (f"output.dir={d / 'afile'}", "is a file; choose a directory"),
        (f"output.dir={d / 'afile' / 'run'}", "which is a file"),
        ("output.dir=", "output.dir is empty"),
        (f"data.cache_dir={d / 'afile'}", "is a file, not a directory"),
        (
            "lora.target_modules=lm_head distill.enabled=false",
            "pruning.criterion=lora needs LoRA on at least one of q_proj",
        ),
        ("pruning.target_sparsity=0.99 pruning.max_layer_sparsity=0.995", "cannot be reached on this model"),
    ]
    for override, message in cases:
        cfg = write_config(tmp_path / "c.yaml", model, out)
        assert main(["--config", str(cfg), *override.split()]) == 2, override
        err = capsys.readouterr().err
        assert message in err, (override, err[-2000:])
        assert "Loading weights" not in err and not out.exists(), override
    # The same target with caps that allow it is accepted at load (it fails later only for other reasons).
    with pytest.raises(ConfigError, match="cannot be reached"):
        check_reachable(structure_from_config(AutoConfig.from_pretrained(model)), PruningConfig(target_sparsity=0.95))
    check_reachable(structure_from_config(AutoConfig.from_pretrained(model)), PruningConfig(target_sparsity=0.85))
