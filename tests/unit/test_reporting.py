"""What a run reports outside itself: W&B (offline) next to TensorBoard, lm-eval results in summary.json
and the card, Hub-valid model and adapter cards, the strided perplexity helper, and the plots."""

from __future__ import annotations

import json

import pytest
from conftest import DEMO_VALID, SUMMARY
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks import report as bench_report
from pipeline.config.schema import ConfigError, config_from_dict
from pipeline.export.cards import base_license, base_model_id
from pipeline.train.evaluation import perplexity, strided_perplexity

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
