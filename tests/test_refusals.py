"""Bad input that used to give a traceback: one message naming the problem and the fix, exit 2, before
any model is loaded (issue 17)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import DEMO_VALID, ROOT

from pipeline.model_source import ModelError, check_model_dir


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def evaluate_tool(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = importlib.util.spec_from_file_location("evaluate_tool17", ROOT / "tools" / "evaluate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_truncated_weights_and_invalid_config_are_refused(make_model, tmp_path):
    bad = _copy(make_model("llama"), tmp_path / "m")
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ModelError, match="model.safetensors is truncated: .* bytes, its header describes"):
        check_model_dir(bad, str(bad))
    w.write_bytes(b"\x00" * 4)
    with pytest.raises(ModelError, match="model.safetensors is truncated or not a safetensors file"):
        check_model_dir(bad, str(bad))
    (bad / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ModelError, match="config.json is not valid JSON"):
        check_model_dir(bad, str(bad))


def test_run_directory_given_as_a_model(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(ModelError, match="a pruning run's directory .*tools/compact.py --run"):
        check_model_dir(tmp_path, str(tmp_path))


def test_evaluate_refuses_before_loading(make_model, tmp_path, evaluate_tool, capsys):
    model = make_model("llama")  # max_position_embeddings 256
    text = str(DEMO_VALID)
    cases = [
        (["--model", str(tmp_path / "nowhere")], "--model=" + str(tmp_path / "nowhere") + ": not a directory"),
        (["--model", "org/not-cached"], "not in the local Hugging Face cache"),
        (["--model", str(model), "--seq-len", "0"], "--seq-len 0: must be >= 2"),
        (["--model", str(model), "--seq-len", "4096"], "--seq-len 4096 exceeds the context of --model"),
    ]
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "summary.json").write_text("{}")
    cases.append((["--model", str(run)], "a pruning run's directory"))
    trunc = _copy(model, tmp_path / "trunc")
    (trunc / "model.safetensors").write_bytes((trunc / "model.safetensors").read_bytes()[:1000])
    cases.append((["--model", str(trunc)], "model.safetensors is truncated"))
    for argv, message in cases:
        assert evaluate_tool.main([*argv, "--text", text, "--speed-batch", "0"]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


def test_remote_code_only_when_the_model_has_it(make_model, tmp_path, evaluate_tool):
    model = make_model("llama")
    assert not evaluate_tool.needs_remote_code(model)
    custom = _copy(model, tmp_path / "custom")
    conf = json.loads((custom / "config.json").read_text())
    conf["auto_map"] = {"AutoModelForCausalLM": "modeling_pruned.PrunedForCausalLM"}
    (custom / "config.json").write_text(json.dumps(conf))
    assert evaluate_tool.needs_remote_code(custom)
