"""What a run reports outside itself: W&B (offline) next to TensorBoard, lm-eval results in summary.json
and the card, Hub-valid model and adapter cards, the strided perplexity helper, and the plots."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import DEMO_VALID, ROOT, read_summary, run_pipeline, write_config
from huggingface_hub import ModelCard
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer
from wandb_records import read_run

from benchmarks import report as bench_report
from pipeline.config.schema import ConfigError, LoggingConfig, config_from_dict
from pipeline.export.cards import base_license, base_model_id
from pipeline.train.evaluation import lm_eval_task_manager, perplexity, run_lm_eval, strided_perplexity
from pipeline.train.logs import RunLogger

TASK_DATA = ROOT / "tests" / "data" / "lm_eval" / "tiny_vim.jsonl"
SUMMARY = {  # the fields of summary.json the loggers and plots read
    "model_path": "models/tiny",
    "criterion": "lora",
    "scope": "global",
    "target_sparsity": 0.5,
    "achieved_sparsity": 0.4821,
    "eval_ppl_after": 12.5,
    "structure": {"num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 96},
    "kept_heads_per_layer": [8, 2],
    "kept_kv_heads_per_layer": [4, 1],
    "kept_channels_per_layer": [70, 30],
    "perf": {"step_s": 0.5},
}


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    """A local lm-eval task (CI has no task data): two-choice questions over tests/data/lm_eval/tiny_vim.jsonl."""
    d = tmp_path / "tasks"
    d.mkdir()
    task = {
        "task": "tiny_vim",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(TASK_DATA)}},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": "{{choices}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    (d / "tiny_vim.yaml").write_text(yaml.safe_dump(task))
    return d


@pytest.fixture
def wandb_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))


# ------------------------------------------------------------------------------------------ config


def _cfg(**sections: dict) -> dict:
    return {"model": {"path": "m"}, "data": {"train": "t.txt"}, **sections}


def test_logging_and_eval_sections_are_typed_and_checked(tmp_path):
    cfg = config_from_dict(_cfg(logging={"report_to": "tensorboard,wandb", "project": "p"}))
    assert cfg.logging.report_to == ["tensorboard", "wandb"] and cfg.logging.project == "p"
    assert config_from_dict(_cfg(eval={"lm_eval_tasks": ["arc_easy"], "lm_eval_limit": 0.5})).eval.lm_eval_limit == 0.5
    with pytest.raises(ConfigError) as e:
        config_from_dict(
            _cfg(
                logging={"report_to": ["wandb", "none", "mlflow"]},
                eval={"lm_eval_limit": -1, "lm_eval_batch_size": 0, "lm_eval_include_path": str(tmp_path / "no")},
            )
        )
    msg = str(e.value)
    for part in ("'mlflow' is not one of", "none cannot be combined", "lm_eval_limit=-1.0", "lm_eval_batch_size=0"):
        assert part in msg
    assert "not a directory of task YAML files" in msg and "5 problem(s)" in msg
    with pytest.raises(ConfigError, match=r"unknown key logging.report"):
        config_from_dict(_cfg(logging={"report": "wandb"}))


def test_missing_optional_packages_are_named(monkeypatch):
    import pipeline.config.schema as C

    monkeypatch.setattr(C, "_missing", lambda module: True)  # as on a machine without the extras
    with pytest.raises(ConfigError) as e:
        config_from_dict(_cfg(logging={"report_to": "wandb"}, eval={"lm_eval_tasks": "arc_easy"}))
    assert "pip install -e '.[wandb]'" in str(e.value) and "pip install -e '.[eval]'" in str(e.value)
    # a finished run's config is still readable there (tools/compact.py needs neither package)
    config_from_dict(_cfg(logging={"report_to": "wandb"}), check_environment=False)


# ------------------------------------------------------------------------------------------ loggers


def test_wandb_offline_logs_what_tensorboard_logs(tmp_path, wandb_offline):
    out = tmp_path / "run"
    out.mkdir()
    lg = LoggingConfig(report_to=["tensorboard", "wandb"], project="proj", run_name="")
    log = RunLogger(out, 3, 0, lg, {"pruning": {"target_sparsity": 0.5}})
    for step in (1, 2, 3):
        log.scalars(step, {"train/loss": 1.0 / step, "eval/ppl": math.nan if step < 3 else 9.0})
    log.final(3, SUMMARY)
    log.close()
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    rec = read_run(run_dir)
    assert rec["name"] == "run" and rec["project"] == "proj"
    assert rec["config"]["pruning"] == {"target_sparsity": 0.5}
    losses = {h["_step"]: h["train/loss"] for h in rec["history"] if "train/loss" in h}
    assert losses == {1: 1.0, 2: 0.5, 3: pytest.approx(1 / 3)}
    assert [h["eval/ppl"] for h in rec["history"] if "eval/ppl" in h] == [9.0]  # NaN (no eval yet) left out
    assert rec["summary"]["achieved_sparsity"] == 0.4821 and rec["summary"]["perf/step_s"] == 0.5
    table = next(h for h in rec["history"] if "kept_widths/_type" in h)
    assert table["kept_widths/_type"] == "table-file" and table["kept_widths/nrows"] == 2
    (table_file,) = run_dir.glob("files/media/table/kept_widths_*.table.json")
    assert json.loads(table_file.read_text())["data"][1] == [1, 2, 8, 1, 4, 30, 96]
    ea = EventAccumulator(str(out / "tb"))
    ea.Reload()
    assert [e.value for e in ea.Scalars("train/loss")] == pytest.approx([1.0, 0.5, 1 / 3])
    assert "kept_widths/text_summary" in ea.Tags()["tensors"]
    # a second run into the same output.dir (a resume) continues the same W&B run id
    RunLogger(out, 3, 3, lg, {}).close()
    assert {read_run(d)["id"] for d in (out / "wandb").glob("offline-run-*")} == {rec["id"]}


# ------------------------------------------------------------------------------------------ evaluation


def test_strided_perplexity_matches_windows_and_uses_context(make_model, tmp_path):
    model_dir = make_model("llama")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(DEMO_VALID.read_text(), return_tensors="pt").input_ids[0][: 4 * 64]
    # non-overlapping windows (the papers' setting) = the plain windowed perplexity of the same tokens
    nll, ppl, n = strided_perplexity(model, tok, DEMO_VALID, window=64, max_tokens=4 * 64)
    ref = perplexity(model, ids.view(4, 64))
    assert n == 4 * 63 and nll == pytest.approx(ref[0], rel=1e-5) and ppl == pytest.approx(ref[1], rel=1e-5)
    # with a stride, every token after the first is scored exactly once, with more context
    nll_s, _, n_s = strided_perplexity(model, tok, DEMO_VALID, window=64, stride=16, max_tokens=4 * 64)
    assert n_s == 4 * 64 - 1 and nll_s != pytest.approx(nll, rel=1e-4)
    # the window is capped at the model's context (conftest models: 256 positions)
    assert strided_perplexity(model, tok, DEMO_VALID, window=100000, max_tokens=600)[2] == 600 - 3


def test_lm_eval_runs_a_local_task_and_names_unknown_ones(make_model, task_dir):
    model_dir = make_model("llama")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    tm = lm_eval_task_manager(["tiny_vim"], str(task_dir))
    res = run_lm_eval(model, tok, ["tiny_vim"], batch_size=4, task_manager=tm)
    assert set(res) == {"tiny_vim"} and res["tiny_vim"]["acc"] in {k / 8 for k in range(9)}
    limited = run_lm_eval(model, tok, ["tiny_vim"], limit=4, batch_size=4, task_manager=tm)
    assert limited["tiny_vim"]["acc"] in {k / 4 for k in range(5)}
    with pytest.raises(ValueError, match=r"unknown lm-evaluation-harness task\(s\): tiny_vm \(did you mean tiny_vim"):
        lm_eval_task_manager(["tiny_vm"], str(task_dir))


def test_evaluate_tool_puts_models_side_by_side(make_model, task_dir, tmp_path, capsys):
    a, b = make_model("llama"), make_model("mistral")
    saved = list(sys.path)  # the script rewrites sys.path[0]
    try:
        cli = importlib.import_module("pipeline.cli.evaluate")  # the command tools/evaluate.py wraps
        args = ["--model", str(a), "--model", str(b), "--text", str(DEMO_VALID), "--seq-len", "64"]
        args += ["--max-tokens", "512", "--speed-batch", "0", "--strided", "--window", "128"]
        args += ["--json", str(tmp_path / "r.json")]
        args += ["--lm-eval-tasks", "tiny_vim", "--lm-eval-include-path", str(task_dir), "--lm-eval-limit", "4"]
        assert cli.main(args) == 0
    finally:
        sys.path[:] = saved
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    row = next(line for line in out.splitlines() if line.startswith("| tiny_vim | acc |"))
    assert row == f"| tiny_vim | acc | {report[str(a)]['lm_eval']['tiny_vim']['acc']:.4f} | " + (
        f"{report[str(b)]['lm_eval']['tiny_vim']['acc']:.4f} |"
    )
    assert report[str(a)]["strided"]["window"] == 128 and "strided ppl" in out


# ------------------------------------------------------------------------------------------ cards


def test_base_model_is_a_repo_id_never_a_folder(make_model, tmp_path):
    d = make_model("llama")
    assert base_model_id(d, str(d)) is None  # a local folder names no Hub repo
    cfg = json.loads((d / "config.json").read_text())
    for name, want in (("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M"), (str(d), None), ("./x/y", None)):
        named = tmp_path / f"named-{abs(hash(name))}"
        named.mkdir()
        (named / "config.json").write_text(json.dumps({**cfg, "_name_or_path": name}))
        assert base_model_id(named, str(named)) == want
    snap = tmp_path / "hub" / "models--org--tiny-model" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(cfg))
    assert base_model_id(snap, str(snap)) == "org/tiny-model"
    # a GGUF file that records its Hub repo and license (a converted directory's source.json points at it)
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_string("general.source.huggingface.repository", "SomeOrg/some-model")
    w.add_string("general.license", "apache-2.0")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    conv = tmp_path / "converted"
    conv.mkdir()
    (conv / "config.json").write_text(json.dumps(cfg))
    src = {"format": "gguf", "file": "m.gguf", "path": str(tmp_path / "m.gguf")}
    (conv / "source.json").write_text(json.dumps(src))
    assert base_model_id(conv, str(tmp_path / "m.gguf")) == "SomeOrg/some-model"
    assert base_license(conv) == "apache-2.0"


# ------------------------------------------------------------------------------------------ plots


def test_plots_render(tmp_path):
    bench_report.plot_widths(SUMMARY, tmp_path / "widths.png")
    rows = [
        {"method": m, "scope": sc, "sparsity": s, "ok": True, "base": "nf4", "ppl_after": a + s, "ppl_oneshot": o * s}
        for m, a, o in (("lora", 40, 100), ("taylor", 40.1, 120), ("random", 50, 900))
        for sc in ("global", "uniform")
        for s in (0.2, 0.5)
    ]
    results = {
        "settings": {"scopes": ["global", "uniform"], "sparsities": [0.2, 0.5], "methods": ["lora", "taylor", "random"]}
        | {"model": "m", "steps": 10},
        "quality": rows,
        "dense": {"nf4": {"ppl_before": 41.0, "ppl_after": 39.0}, "none": {"ppl_before": 40.9, "ppl_after": 38.9}},
    }
    bench_report.plot_quality(results, tmp_path / "quality.png")
    for f in ("widths.png", "quality.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ a real run


def _snippet(readme: str) -> str:
    return re.search(r"```python\n(.*?)```", readme, re.S).group(1)


@pytest.mark.distributed
def test_run_reports_to_wandb_and_lm_eval_into_summary_and_cards(make_model, tmp_path, task_dir, wandb_offline):
    run = tmp_path / "run"
    cfg = write_config(
        tmp_path / "cfg.yaml",
        make_model("llama"),
        run,
        logging={"report_to": ["tensorboard", "wandb"], "project": "prune-test"},
        eval={"lm_eval_tasks": ["tiny_vim"], "lm_eval_include_path": str(task_dir), "lm_eval_batch_size": 4},
    )
    # 2 ZeRO-3 ranks: W&B on rank 0 only; lm-eval's forwards on every rank (they are collective)
    proc = run_pipeline(cfg, ranks=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = read_summary(run)
    acc = summary["lm_eval"]["tiny_vim"]["acc"]
    assert acc in {k / 8 for k in range(9)}
    assert (run / "widths.png").read_bytes()[:4] == b"\x89PNG"
    (wb_dir,) = (run / "wandb").glob("offline-run-*")  # one run: rank 1 logged nothing
    rec = read_run(wb_dir)
    assert rec["config"]["pruning"]["target_sparsity"] == 0.5 and rec["config"]["eval"]["lm_eval_tasks"] == ["tiny_vim"]
    steps = {h["_step"] for h in rec["history"] if "train/loss" in h}
    assert steps == set(range(1, 7))
    assert rec["summary"]["lm_eval/tiny_vim/acc"] == acc and rec["summary"]["eval_ppl_after"] == pytest.approx(
        summary["eval_ppl_after"]
    )
    ea = EventAccumulator(str(run / "tb"))
    ea.Reload()
    assert ea.Scalars("lm_eval/tiny_vim/acc")[0].value == pytest.approx(acc)
    adapter = ModelCard.load(run / "adapter" / "README.md")
    assert adapter.data.library_name == "peft" and "base_model" not in adapter.data.to_dict()
    assert "trained by lora-prune-pipeline" in adapter.text and "criterion lora" in adapter.text

    out = tmp_path / "compact"
    saved = list(sys.path)  # the script rewrites sys.path[0]
    try:
        cli = importlib.import_module("pipeline.cli.compact")  # the command tools/compact.py wraps
        assert cli.main(["--run", str(run), "--out", str(out)]) == 0
    finally:
        sys.path[:] = saved
    readme = (out / "README.md").read_text()
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["pipeline_tag"] == "text-generation" and meta["library_name"] == "transformers"
    assert {"pruning", "lora"} <= set(meta["tags"]) and "base_model" not in meta  # a local base: no folder name
    results = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("tiny_vim", "acc")] == pytest.approx(acc)
    assert results[(DEMO_VALID.name, "perplexity")] == pytest.approx(summary["eval_ppl_after"], rel=1e-4)
    assert "| tiny_vim | acc |" in readme and "| layer | query heads | KV heads | MLP channels |" in readme
    scope: dict = {}
    exec(_snippet(readme), scope)  # the card's load snippet, as written
    assert scope["model"].config.num_hidden_layers == 2 and isinstance(scope["output"], torch.Tensor)
