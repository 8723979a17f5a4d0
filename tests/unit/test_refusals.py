"""Bad input that used to give a traceback: one message naming the problem and the fix, exit 2, before
any model is loaded (issue 17)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO_VALID, write_config

from pipeline.config.schema import ConfigError, config_from_dict
from pipeline.model.source import ModelError, check_model_dir


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def evaluate_tool(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    tool = importlib.import_module("pipeline.cli.evaluate")  # the command tools/evaluate.py wraps
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


def test_target_sparsity_one_does_not_suggest_raising_the_cap():
    with pytest.raises(ConfigError) as e:
        config_from_dict({"model": {"path": "m"}, "data": {"train": "t"}, "pruning": {"target_sparsity": 1.0}})
    assert "must be in [0, 1)" in str(e.value) and "raise pruning.max_layer_sparsity" not in str(e.value)


def test_jsonl_error_names_the_1_based_line(tmp_path):
    from pipeline.data.dataset import DataError, _read

    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a"}\n' * 150 + "{broken\n" + '{"text": "b"}\n')
    with pytest.raises(DataError, match=r"d.jsonl: line 151: not valid JSON"):
        _read(str(f), "data.train")


def test_corrupt_cache_entry_is_rebuilt(make_model, tmp_path, capsys):
    from transformers import AutoTokenizer

    from pipeline.data.dataset import _cache_key, _cache_path, source_windows, tokenizer_fingerprint

    tok = AutoTokenizer.from_pretrained(make_model("llama"))
    cfg = config_from_dict(
        {"model": {"path": "m"}, "data": {"train": str(DEMO_VALID), "seq_len": 32, "cache_dir": str(tmp_path / "c")}}
    ).data
    src = cfg.sources("train")[0]
    fp = tokenizer_fingerprint(tok)
    first, hit = source_windows(src, cfg, 32, tok, fp)
    assert not hit
    entry = _cache_path(cfg, _cache_key(src, cfg, 32, fp)) / "windows.npz"
    entry.write_bytes(entry.read_bytes()[:100])
    again, hit = source_windows(src, cfg, 32, tok, fp)
    assert not hit and torch.equal(again.input_ids, first.input_ids)
    err = capsys.readouterr().err
    assert "unreadable" in err and "rebuilding it" in err
    assert source_windows(src, cfg, 32, tok, fp)[1]  # stored again: a hit


def test_bert_and_every_checkpoint_corrupt_get_accurate_messages(make_model, tmp_path, restore_env, capsys):
    from synthetic_runs import fake_checkpoint
    from transformers import BertConfig, BertLMHeadModel

    from pipeline.run import main

    model = make_model("llama")
    bert = tmp_path / "bert"
    conf = BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64, is_decoder=True)
    BertLMHeadModel(conf).save_pretrained(bert)
    cfg = write_config(tmp_path / "b.yaml", bert, tmp_path / "bout")
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "BertLMHeadModel: no model.layers" in err and "modules include []" not in err

    out = tmp_path / "broken"
    for step in (2, 4):
        (fake_checkpoint(out / "checkpoints", step) / "manifest.json").unlink()
    cfg = write_config(tmp_path / "c.yaml", model, out)
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "none of its 2 checkpoint(s) is complete" in err and "resume it with train.resume=auto" not in err


def test_compact_base_truncated_or_other_weights_is_refused(make_model, tmp_path):
    """--base: a truncated file is refused by its header; a same-shape model with other weights by the
    fingerprint the run recorded in summary.json."""
    from safetensors.torch import load_file, save_file
    from synthetic_runs import make_run

    from pipeline.export.compact import ExportError, load_run
    from pipeline.model.fingerprint import model_fingerprint

    model = make_model("llama")
    run = make_run(tmp_path, model, "uniform_kv")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "fingerprints": {"base": model_fingerprint(model)}}))
    assert load_run(run).base_dir == model  # the recorded base itself: accepted

    other = _copy(model, tmp_path / "other")
    w = load_file(other / "model.safetensors")
    w = {k: v * 1.01 for k, v in w.items()}  # same names, shapes, dtypes
    save_file(w, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="not the base model the run was trained on .*same size, different"):
        load_run(run, other)

    trunc = _copy(model, tmp_path / "trunc")
    (trunc / "model.safetensors").write_bytes((trunc / "model.safetensors").read_bytes()[:3000])
    with pytest.raises(ExportError, match=r"base model \(--base\): .*model.safetensors is truncated"):
        load_run(run, trunc)


def test_plan_refuses_nonsense_instead_of_a_verdict(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))
    tool = importlib.import_module("benchmarks.plan")  # the command tools/plan.py wraps
    (tmp_path / "list.json").write_text("[3]")
    for argv, message in (
        (["--link-gbps", "0"], "link_gbps=0.0: must be a finite number > 0"),
        (["--ds-config", str(tmp_path / "list.json")], "expected a JSON object with a zero_optimization object"),
        (["--gpu-mem-gb", "-1"], "gpu_mem_gb=-1.0: must be a finite number > 0"),
        (["--gpu-mem-gb", "nan"], "gpu_mem_gb=nan: must be a finite number > 0"),
    ):
        assert tool.main(["--model", "llama2-7b", *argv]) == 2, argv
        captured = capsys.readouterr()
        assert message in captured.err and "DOES NOT FIT" not in captured.out, argv
