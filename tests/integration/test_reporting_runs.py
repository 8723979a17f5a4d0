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
from conftest import DEMO_VALID, SUMMARY, TASK_DATA, read_summary, run_pipeline, write_config
from huggingface_hub import ModelCard
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer
from wandb_records import read_run

from pipeline.config.schema import LoggingConfig
from pipeline.train.evaluation import lm_eval_task_manager, run_lm_eval
from pipeline.train.logs import RunLogger


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
