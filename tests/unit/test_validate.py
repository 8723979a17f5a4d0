"""The validate command in-process: every problem of a config, its model and data in one message."""

from pathlib import Path

from conftest import ROOT

from pipeline.config.validate import main

DEMO = ROOT / "configs" / "demo.yaml"


def test_five_mistakes_in_one_message(tmp_path: Path, capsys):
    rc = main(
        [
            str(DEMO),
            "train.steps=ten",  # bad type
            "pruning.scope=globl",  # bad choice
            "train.step=5",  # unknown key
            f"model.path={tmp_path / 'no-model'}",  # missing model directory
            f"data.train={tmp_path / 'no-train.txt'}",  # missing data file
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("error:") == 1
    for needle in (
        "train.steps='ten': expected int",
        "pruning.scope='globl': must be one of global, uniform",
        "unknown key train.step (did you mean train.steps?)",
        f"model.path={tmp_path / 'no-model'}",
        f"data.train={tmp_path / 'no-train.txt'}",
    ):
        assert needle in err, needle


def test_a_good_config_is_ok(capsys):
    assert main([str(DEMO)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok") and "4 layers" in out


def test_model_that_cannot_meet_the_pruning_settings(capsys):
    rc = main([str(DEMO), "pruning.target_sparsity=0.99", "pruning.max_layer_sparsity=0.995"])
    assert rc == 2 and "cannot be reached on this model" in capsys.readouterr().err
