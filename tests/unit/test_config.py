from pathlib import Path

import pytest
from conftest import ROOT

from pipeline.config.ds_config import DeepSpeedConfigError, resolve
from pipeline.config.schema import ConfigError, load_config, parse_overrides

SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path):
    cfg = load_config(path)
    assert cfg.model.path and cfg.data.train
    assert (ROOT / cfg.deepspeed.config).is_file(), f"{path.name}: deepspeed.config points at a missing file"


@pytest.mark.parametrize("path", sorted((ROOT / "ds_configs").glob("*.json")), ids=lambda p: p.name)
def test_every_ds_config_resolves(path: Path):
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"deepspeed.config={path}"])
    d = resolve(cfg, world_size=2)
    assert d["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 2


def test_overrides_are_typed():
    cfg = load_config(
        ROOT / "configs" / "demo.yaml",
        ["train.steps=7", "pruning.target_sparsity=0.3", "lora.target_modules=q_proj,down_proj", "train.lr=1e-4"],
    )
    assert cfg.train.steps == 7 and cfg.pruning.target_sparsity == 0.3
    assert cfg.lora.target_modules == ["q_proj", "down_proj"] and cfg.train.lr == 1e-4


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "demo.yaml", ["pruning.target_sparsty=0.5"])
    assert "pruning.target_sparsty" in str(e.value) and "did you mean pruning.target_sparsity" in str(e.value)


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown key prunning"):
        load_config(ROOT / "configs" / "demo.yaml", ["prunning.scope=global"])


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5"])
def test_sparsity_out_of_range(value: str):
    with pytest.raises(ConfigError, match=r"pruning.target_sparsity=.*must be in \[0, 1\)"):
        load_config(ROOT / "configs" / "demo.yaml", [f"pruning.target_sparsity={value}"])


def test_query_heads_with_global_scope_cannot_be_honoured():
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "demo.yaml", ["pruning.head_unit=query", "pruning.scope=global"])
    msg = str(e.value)
    assert "pruning.head_unit=query" in msg and "pruning.scope=uniform" in msg


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["train.steps=ten", "pruning.criterion=l1"],
            ["train.steps='ten': expected int", "pruning.criterion='l1': must be one of"],
        ),
        (
            ["train.step=5", "pruning.scope=globl"],
            ["unknown key train.step (did you mean train.steps?)", "pruning.scope='globl'"],
        ),
        # the field whose type failed keeps its default; the other fields' value rules are still checked
        (
            ["train.lr=fast", "pruning.target_sparsity=1.5"],
            ["train.lr='fast': expected float", "pruning.target_sparsity=1.5"],
        ),
    ],
    ids=["type+choice", "unknown-key+choice", "type+value-rule"],
)
def test_every_problem_collected_in_one_error(overrides: list[str], expected: list[str]):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "demo.yaml", overrides)
    msg = str(e.value)
    assert all(x in msg for x in expected), msg


def test_choices_are_the_literal_types():
    import typing

    from pipeline.config.schema import PruningConfig

    choices = typing.get_args(typing.get_type_hints(PruningConfig)["criterion"])
    with pytest.raises(ConfigError, match="must be one of " + ", ".join(choices)):
        load_config(ROOT / "configs" / "demo.yaml", ["pruning.criterion=l1"])


def test_lora_criterion_without_attention_adapters_fails_at_config_time():
    with pytest.raises(ConfigError, match="pruning.criterion=lora needs LoRA on at least one of q_proj"):
        load_config(ROOT / "configs" / "demo.yaml", ["lora.target_modules=gate_proj,up_proj,down_proj"])
    cfg = load_config(
        ROOT / "configs" / "demo.yaml", ["lora.target_modules=gate_proj,up_proj,down_proj", "pruning.criterion=taylor"]
    )
    assert cfg.lora.target_modules == ["gate_proj", "up_proj", "down_proj"]


def test_resumable_keys_come_from_the_field_metadata():
    from pipeline.config.schema import resumable_keys
    from pipeline.train.checkpoint import RESUMABLE_CHANGES

    assert resumable_keys() == RESUMABLE_CHANGES
    assert {"train.resume", "output.dir", "logging.report_to"} <= RESUMABLE_CHANGES
    assert "pruning.target_sparsity" not in RESUMABLE_CHANGES and "train.lr" not in RESUMABLE_CHANGES


def test_mix_is_typed():
    with pytest.raises(ConfigError, match=r"data.mix='a.jsonl': expected a list of mappings"):
        load_config(ROOT / "configs" / "demo.yaml", ["data.mix=a.jsonl"])


def test_bad_choice():
    with pytest.raises(ConfigError, match="pruning.criterion='l1': must be one of lora"):
        load_config(ROOT / "configs" / "demo.yaml", ["pruning.criterion=l1"])


def test_override_syntax():
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_overrides(["train.steps"])


def test_ds_config_conflict_and_leftover_auto(tmp_path: Path):
    bad = tmp_path / "ds.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 3, "sub_group_size": "auto"}}')
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"deepspeed.config={bad}"])
    with pytest.raises(DeepSpeedConfigError) as e:
        resolve(cfg, world_size=1)
    msg = str(e.value)
    assert "train_micro_batch_size_per_gpu=3 but train.micro_batch_size=4" in msg
    assert 'zero_optimization.sub_group_size="auto"' in msg
