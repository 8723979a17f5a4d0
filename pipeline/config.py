"""Typed run configuration: YAML file + ``dotted.key=value`` overrides, validated at load.

Every problem found is collected and reported in one error that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class InputError(ValueError):
    """Bad input (config, model, data, output dir): the message names the key or file and the fix."""


class ConfigError(InputError):
    """Raised for a config that cannot run; the message lists every problem found."""


@dataclass
class ModelConfig:
    path: str = ""
    quantization: str = "nf4"  # nf4 | none
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    double_quant: bool = True


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class DataConfig:
    train: str = ""
    eval: str = ""
    seq_len: int = 256
    text_field: str = "text"  # field read from jsonl records
    eval_max_tokens: int = 40000  # evaluate on the first N tokens of data.eval (0 = all)
    eval_seq_len: int = 0  # window length for evaluation (0 = data.seq_len)


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    eval_every: int = 0  # 0 = evaluate only before and after training
    log_every: int = 1


@dataclass
class PruningConfig:
    target_sparsity: float = 0.5  # fraction of prunable attention+MLP parameters removed
    criterion: str = "lora"  # lora | taylor | magnitude | random
    scope: str = "global"  # global (across layers) | uniform (same count in every layer)
    head_unit: str = "kv_group"  # kv_group (a KV head with its query heads) | query (same count per group)
    lora_reduce: str = "element"  # element: sum |W' * G| (LoRAPrune) | vector: |sum W' * G| per unit
    normalize: str = "none"  # none: raw scores | l2: per-module, per-layer L2 normalisation (LoRAPrune)
    ema: float = 0.9  # S = ema * S + (1 - ema) * S_new
    score_every: int = 1  # steps between scoring events
    prune_every: int = 10  # steps between mask decisions
    warmup: float = 0.05  # fraction of steps before the first mask decision
    cooldown: float = 0.7  # fraction of steps at the end with the final target held (recovery)
    max_layer_sparsity: float = 0.9  # global scope: no layer loses more than this fraction of a unit kind


@dataclass
class DeepSpeedSection:
    config: str = "ds_configs/zero3_cpu.json"


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    overwrite: bool = False  # allow writing over a finished run in output.dir


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_CHOICES = {
    "model.quantization": ("nf4", "none"),
    "model.dtype": ("auto", "fp32", "bf16", "fp16"),
    "pruning.criterion": ("lora", "taylor", "magnitude", "random"),
    "pruning.scope": ("global", "uniform"),
    "pruning.head_unit": ("kv_group", "query"),
    "pruning.normalize": ("l2", "none"),
    "pruning.lora_reduce": ("element", "vector"),
}


def _validate(cfg: Config) -> list[str]:
    errs: list[str] = []
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            errs.append(f"{key}={value!r}: must be one of {', '.join(choices)}")
    if not cfg.model.path:
        errs.append("model.path is empty: set it to a local Hugging Face model directory")
    if not cfg.data.train:
        errs.append("data.train is empty: set it to a .txt or .jsonl file")
    p = cfg.pruning
    if not 0.0 <= p.target_sparsity < 1.0:
        errs.append(f"pruning.target_sparsity={p.target_sparsity}: must be in [0, 1) (0.5 removes half)")
    if not 0.0 < p.max_layer_sparsity < 1.0:
        errs.append(f"pruning.max_layer_sparsity={p.max_layer_sparsity}: must be in (0, 1)")
    elif p.scope == "global" and p.target_sparsity > p.max_layer_sparsity:
        errs.append(
            f"pruning.target_sparsity={p.target_sparsity} exceeds pruning.max_layer_sparsity="
            f"{p.max_layer_sparsity}: raise pruning.max_layer_sparsity"
        )
    if p.head_unit == "query" and p.scope == "global":
        errs.append(
            "pruning.head_unit=query with pruning.scope=global cannot be honoured: query-head pruning keeps "
            "the same number of query heads in every KV group of every layer; use pruning.scope=uniform "
            "or pruning.head_unit=kv_group"
        )
    if not 0.0 <= p.ema < 1.0:
        errs.append(f"pruning.ema={p.ema}: must be in [0, 1)")
    if p.warmup < 0 or p.cooldown < 0 or p.warmup + p.cooldown >= 1.0:
        errs.append(f"pruning.warmup={p.warmup}, pruning.cooldown={p.cooldown}: each must be >= 0 and their sum < 1")
    for key in (
        "pruning.score_every",
        "pruning.prune_every",
        "train.steps",
        "train.micro_batch_size",
        "train.grad_accum",
        "train.log_every",
        "lora.r",
    ):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            errs.append(f"{key}={getattr(getattr(cfg, section), name)}: must be >= 1")
    for key in ("train.eval_every", "train.warmup_steps", "data.eval_max_tokens", "data.eval_seq_len"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 0:
            errs.append(f"{key}: must be >= 0")
    if cfg.data.seq_len < 2:
        errs.append(f"data.seq_len={cfg.data.seq_len}: must be >= 2")
    if cfg.train.lr <= 0:
        errs.append(f"train.lr={cfg.train.lr}: must be > 0")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        errs.append(f"lora.dropout={cfg.lora.dropout}: must be in [0, 1)")
    if not cfg.lora.target_modules:
        errs.append("lora.target_modules is empty: list the projections to adapt, e.g. [q_proj, o_proj]")
    return errs


def _coerce(value: Any, tp: Any, key: str, errs: list[str]) -> Any:
    """Check a YAML value against a dataclass field type; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin is list:
        if isinstance(value, str):  # CLI: lora.target_modules=q_proj,v_proj
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            errs.append(f"{key}={value!r}: expected a list of strings")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        errs.append(f"{key}={value!r}: expected {tp.__name__}")
    return value


def _apply(obj: Any, data: dict[str, Any], prefix: str, errs: list[str]) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            errs.append(f"unknown key {full}{hint}")
            continue
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                errs.append(f"{full}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(current))}")
            else:
                _apply(current, value, f"{full}.", errs)
        else:
            setattr(obj, key, _coerce(value, hints[key], full, errs))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``a.b=1`` -> {"a": {"b": 1}}; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part}")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    cfg = Config()
    errs: list[str] = []
    _apply(cfg, data, "", errs)
    if not errs:
        errs = _validate(cfg)
    if errs:
        raise ConfigError(f"{source}: {len(errs)} problem(s):\n  - " + "\n  - ".join(errs))
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    data: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections (model, lora, data, ...)")
    data = _merge(data, parse_overrides(overrides or []))
    return config_from_dict(data, source)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
