"""Typed run configuration: YAML file + ``dotted.key=value`` overrides, validated at load.

Every problem found is collected and reported in one error that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError, InputError

__all__ = ["ConfigError", "InputError"]  # re-exported: older imports name them here


# Field metadata of the keys that may differ between a checkpoint's run and the run resuming it: they do
# not change what is computed (train/checkpoint.py refuses any other difference).
RESUMABLE = {"resumable": True}


@dataclass
class ModelConfig:
    path: str = ""
    quantization: Literal["nf4", "none"] = "nf4"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    double_quant: bool = True


@dataclass
class RankPruningConfig:
    """PrunedLoRA-style: adapters start at ``init_r`` and lose rank-1 components down to ``target_r``."""

    enabled: bool = False
    init_r: int = 32
    target_r: float = 8.0  # average rank over the adapted modules at the end
    warmup: float = 0.05  # fraction of steps before the first removal
    cooldown: float = 0.7  # fraction of steps at the end with the final ranks held
    every: int = 10  # steps between removals
    ema: float = 0.9  # moving average of the coefficient-gradient second moment


@dataclass
class LoraConfig:
    r: int = 8  # ignored when rank_pruning.enabled (init_r is used)
    alpha: float = 16.0
    dropout: float = 0.0
    rank_dropout: float = 0.0  # DropLoRA: Bernoulli dropout on the r-dim code between A and B
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    rank_pruning: RankPruningConfig = field(default_factory=RankPruningConfig)


DataFormat = Literal["auto", "text", "jsonl", "alpaca", "chat"]
DATA_FORMATS: tuple[str, ...] = typing.get_args(DataFormat)
_MIX_KEYS = ("path", "format", "weight", "text_field")


@dataclass(frozen=True)
class DataSource:
    """One data file or save_to_disk directory, as pipeline/data/dataset.py reads it."""

    key: str  # where it is configured, for messages: data.train, data.mix[1], data.eval
    path: str
    format: str
    text_field: str
    weight: float = 1.0  # training epochs of this source per epoch of the mix (0.5 = a seeded half)


@dataclass
class DataConfig:
    train: str = ""  # a text/record file or save_to_disk directory
    eval: str = ""
    # More training sources: a list of {path, format, weight, text_field}; format and text_field
    # default to data.format and data.text_field, weight to 1.
    mix: list[dict[str, Any]] = field(default_factory=list)
    format: DataFormat = "auto"  # jsonl = text
    # data.eval's own format (not data.format): a plain-text eval file next to alpaca/chat training data
    eval_format: DataFormat = "auto"
    text_field: str = "text"  # field read from records in the text format
    seq_len: int = 256
    packing: bool = True  # concatenate documents into seq_len windows; false: one padded row per example
    truncation: bool = False  # unpacked: cut examples longer than seq_len instead of stopping
    train_on_prompt: bool = False  # instruction/chat data: loss on prompt tokens too
    num_proc: int = field(metadata=RESUMABLE, default=2)  # tokenizer processes (datasets.map)
    # tokenized windows; "" = ~/.cache/lora-prune/data ($XDG_CACHE_HOME), "none" = off
    cache_dir: str = field(metadata=RESUMABLE, default="")
    eval_max_tokens: int = 40000  # evaluate on the first N tokens of data.eval (0 = all)
    eval_seq_len: int = 0  # window length for evaluation (0 = data.seq_len)

    def sources(self, split: str) -> list[DataSource]:
        """The sources of ``split`` ("train": data.train then data.mix; "eval": data.eval)."""
        if split == "eval":
            return [DataSource("data.eval", self.eval, self.eval_format, self.text_field)] if self.eval else []
        out = [DataSource("data.train", self.train, self.format, self.text_field)] if self.train else []
        for i, e in enumerate(self.mix):
            fmt, text_field = e.get("format", self.format), e.get("text_field", self.text_field)
            out.append(DataSource(f"data.mix[{i}]", str(e["path"]), fmt, text_field, float(e.get("weight", 1.0))))
        return out


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0  # cosine decay ends at lr * min_lr_ratio (1 = constant, measured best)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    gradient_checkpointing: bool = False
    eval_every: int = field(metadata=RESUMABLE, default=0)  # 0 = evaluate only before and after training
    log_every: int = field(metadata=RESUMABLE, default=1)
    # steps between checkpoints in output.dir/checkpoints (0 = only on SIGTERM)
    save_every: int = field(metadata=RESUMABLE, default=0)
    # checkpoints kept; older ones are deleted once a newer one is complete
    keep_last: int = field(metadata=RESUMABLE, default=2)
    # auto: newest complete checkpoint in output.dir, if any | none | a checkpoint path
    resume: str = field(metadata=RESUMABLE, default="auto")
    # steps with a non-finite loss or gradient before the run stops
    max_bad_steps: int = field(metadata=RESUMABLE, default=10)


@dataclass
class PruningConfig:
    target_sparsity: float = 0.5  # fraction of prunable attention+MLP parameters removed
    # full_grad: the reference, needs model.quantization=none
    criterion: Literal["lora", "full_grad", "taylor", "magnitude", "random"] = "lora"
    scope: Literal["global", "uniform"] = "global"  # global: across layers | uniform: same count in every layer
    # kv_group: a KV head with its query heads | query: the same count per group
    head_unit: Literal["kv_group", "query"] = "kv_group"
    # element: sum |W' * G| (LoRAPrune) | vector: |sum W' * G| per unit
    lora_reduce: Literal["element", "vector"] = "element"
    normalize: Literal["none", "l2"] = "none"  # none: raw scores | l2: per-module, per-layer L2 (LoRAPrune)
    # criterion lora: score = lora/mean + mix * |dL/dm|/mean per unit kind (0 = LoRA scores alone)
    mask_grad_mix: float = 1.0
    ema: float = 0.9  # S = ema * S + (1 - ema) * S_new
    score_every: int = 1  # steps between scoring events
    prune_every: int = 10  # steps between mask decisions
    warmup: float = 0.05  # fraction of steps before the first mask decision
    cooldown: float = 0.7  # fraction of steps at the end with the final target held (recovery)
    max_layer_sparsity: float = 0.9  # global scope: no layer loses more than this fraction of a unit kind
    # Serving widths (pipeline/pruning/selection.py): MLP channels kept per layer are a multiple of round_to
    # (or all; 0 = auto: 64, or less where a layer would get fewer than 8 blocks); kv_heads_multiple_of > 0
    # keeps the same KV heads in every layer, a multiple of it (no
    # zero-head padding on export; a tensor-parallel size that divides it shards every layer).
    round_to: int = 0
    kv_heads_multiple_of: int = 0
    # Shrink in flight (pipeline/train/shrink.py): cut the pruned units out of the model being trained at the
    # final decision (final) or at every decision, so the steps after it train the smaller model | off: masks
    # only. shrink_columns: o_proj/down_proj lose columns across NF4 blocks: keep them dense (exact; measured
    # best on the tuning halves, docs/BENCHMARKS.md) | requantize them to NF4 (less memory).
    shrink: Literal["off", "final", "every_decision"] = "off"
    shrink_columns: Literal["dense", "requantize"] = "dense"


@dataclass
class DistillConfig:
    """Self-distillation from the dense model (pipeline/train/distill.py)."""

    enabled: bool = True  # measured better at every sparsity and scope tried (docs/BENCHMARKS.md)
    alpha: float = 0.5  # loss = (1 - alpha) * CE + alpha * T^2 * KL(teacher || student)
    temperature: float = 1.0
    teacher: str = "base"  # base: this model with adapters and masks off, same engine | a model path
    top_k: int = 0  # 0: KL over the whole vocabulary; k: over the teacher's k most likely tokens
    chunk_tokens: int = 1024  # positions per logit chunk (memory: chunk x vocabulary)


@dataclass
class DeepSpeedSection:
    config: str = "ds_configs/zero3_cpu.json"


@dataclass
class OutputConfig:
    dir: str = field(metadata=RESUMABLE, default="runs/default")
    overwrite: bool = field(metadata=RESUMABLE, default=False)  # allow writing over a finished run in output.dir


REPORT_TO = ("tensorboard", "wandb", "none")
WANDB_MISSING = "wandb is not installed: pip install -e '.[wandb]'"
LM_EVAL_MISSING = (
    "the lm-evaluation-harness is not installed: pip install -e '.[eval]' (its built-in tasks download "
    "their data sets from the Hugging Face Hub on first use)"
)


@dataclass
class LoggingConfig:
    # tensorboard | wandb | both (a list, or "tensorboard,wandb") | none; rank 0 only
    report_to: list[str] = field(metadata=RESUMABLE, default_factory=lambda: ["tensorboard"])
    project: str = field(metadata=RESUMABLE, default="lora-prune")  # W&B project
    run_name: str = field(metadata=RESUMABLE, default="")  # W&B run name; "" = the name of output.dir


@dataclass
class EvalConfig:
    """lm-evaluation-harness tasks run once at the end, on the masked model (base + adapters + masks)."""

    lm_eval_tasks: list[str] = field(metadata=RESUMABLE, default_factory=list)  # e.g. [arc_easy, hellaswag]; [] = none
    lm_eval_limit: float = field(metadata=RESUMABLE, default=0.0)  # examples per task (a fraction if < 1); 0 = all
    lm_eval_batch_size: int = field(metadata=RESUMABLE, default=8)
    lm_eval_num_fewshot: int = field(metadata=RESUMABLE, default=-1)  # -1 = each task's default
    # a folder of extra task YAMLs (local tasks), searched before the built-in ones
    lm_eval_include_path: str = field(metadata=RESUMABLE, default="")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    output: OutputConfig = field(default_factory=OutputConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def resumable_keys(cls: type | None = None, prefix: str = "") -> frozenset[str]:
    """Dotted names of the ``resumable`` fields of ``cls`` (default: Config) and its sections."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out |= resumable_keys(hints[f.name], f"{prefix}{f.name}.")
        elif f.metadata.get("resumable"):
            out.add(f"{prefix}{f.name}")
    return frozenset(out)


def _validate(cfg: Config, check_environment: bool = True) -> list[str]:
    errs: list[str] = []
    if not cfg.model.path:
        errs.append("model.path is empty: set it to a local Hugging Face model directory")
    if not str(cfg.output.dir).strip():
        errs.append("output.dir is empty: set it to the run's directory, e.g. output.dir=runs/my-run")
    errs += _validate_data(cfg.data)
    p = cfg.pruning
    if not 0.0 <= p.target_sparsity < 1.0:
        errs.append(f"pruning.target_sparsity={p.target_sparsity}: must be in [0, 1) (0.5 removes half)")
    if not 0.0 < p.max_layer_sparsity < 1.0:
        errs.append(f"pruning.max_layer_sparsity={p.max_layer_sparsity}: must be in (0, 1)")
    elif p.scope == "global" and p.max_layer_sparsity < p.target_sparsity < 1.0:
        errs.append(
            f"pruning.target_sparsity={p.target_sparsity} exceeds pruning.max_layer_sparsity="
            f"{p.max_layer_sparsity}: raise pruning.max_layer_sparsity"
        )
    if p.criterion == "full_grad" and cfg.model.quantization != "none":
        errs.append(
            f"pruning.criterion=full_grad with model.quantization={cfg.model.quantization}: the full-gradient "
            "reference needs the full-precision base weights; set model.quantization=none (or use "
            "pruning.criterion=lora, which works on the 4-bit base)"
        )
    if p.head_unit == "query" and p.scope == "global":
        errs.append(
            "pruning.head_unit=query with pruning.scope=global cannot be honoured: query-head pruning keeps "
            "the same number of query heads in every KV group of every layer; use pruning.scope=uniform "
            "or pruning.head_unit=kv_group"
        )
    if p.round_to < 0:
        errs.append(f"pruning.round_to={p.round_to}: must be >= 0 (0 = auto, 1 = any channel count)")
    if p.kv_heads_multiple_of < 0:
        errs.append(f"pruning.kv_heads_multiple_of={p.kv_heads_multiple_of}: must be >= 0 (0 = off)")
    if not 0.0 <= p.ema < 1.0:
        errs.append(f"pruning.ema={p.ema}: must be in [0, 1)")
    if not p.mask_grad_mix >= 0.0:
        errs.append(f"pruning.mask_grad_mix={p.mask_grad_mix}: must be >= 0 (0 = LoRA scores alone)")
    if p.warmup < 0 or p.cooldown < 0 or p.warmup + p.cooldown >= 1.0:
        errs.append(f"pruning.warmup={p.warmup}, pruning.cooldown={p.cooldown}: each must be >= 0 and their sum < 1")
    for key in (
        "pruning.score_every",
        "pruning.prune_every",
        "train.steps",
        "train.micro_batch_size",
        "train.grad_accum",
        "train.log_every",
        "train.keep_last",
        "train.max_bad_steps",
        "lora.r",
    ):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            errs.append(f"{key}={getattr(getattr(cfg, section), name)}: must be >= 1")
    if not cfg.train.resume:
        errs.append("train.resume is empty: use auto (continue the newest checkpoint), none, or a checkpoint path")
    for key in ("train.eval_every", "train.warmup_steps", "train.save_every"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 0:
            errs.append(f"{key}: must be >= 0")
    if cfg.train.lr <= 0:
        errs.append(f"train.lr={cfg.train.lr}: must be > 0")
    rp = cfg.lora.rank_pruning
    if rp.enabled:
        if rp.init_r < 2 or not 1 <= rp.target_r < rp.init_r:
            errs.append(
                f"lora.rank_pruning: init_r={rp.init_r}, target_r={rp.target_r}: need init_r >= 2 and "
                "1 <= target_r < init_r (e.g. init_r=32 target_r=8)"
            )
        if rp.warmup < 0 or rp.cooldown < 0 or rp.warmup + rp.cooldown >= 1.0 or rp.every < 1:
            errs.append("lora.rank_pruning: warmup, cooldown >= 0 with warmup + cooldown < 1, and every >= 1")
        if not 0.0 <= rp.ema < 1.0:
            errs.append(f"lora.rank_pruning.ema={rp.ema}: must be in [0, 1)")
    if not 0.0 <= cfg.lora.rank_dropout < 1.0:
        errs.append(f"lora.rank_dropout={cfg.lora.rank_dropout}: must be in [0, 1) (0.1 to 0.5 are usual)")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        errs.append(f"lora.dropout={cfg.lora.dropout}: must be in [0, 1)")
    if not cfg.lora.target_modules:
        errs.append("lora.target_modules is empty: list the projections to adapt, e.g. [q_proj, o_proj]")
    errs += lora_coverage_problems(p.criterion, {m.rsplit(".", 1)[-1] for m in cfg.lora.target_modules})
    errs += _validate_distill(cfg)
    errs += _validate_logging(cfg.logging, check_environment)
    errs += _validate_eval(cfg.eval, check_environment)
    return errs


# criterion=lora scores each unit kind from the adapters on its projections: the one definition of which.
LORA_SCORED_BY = (
    ("heads", ("q_proj", "k_proj", "v_proj", "o_proj")),
    ("channels", ("gate_proj", "up_proj", "down_proj")),
)


def lora_coverage_problems(criterion: str, adapted: set[str]) -> list[str]:
    """``adapted``: projection names with LoRA (from lora.target_modules, or read off the loaded model)."""
    if criterion != "lora":
        return []
    return [
        f"pruning.criterion=lora needs LoRA on at least one of {', '.join(names)} to score {kind} "
        f"(lora.target_modules={sorted(adapted) or 'none of them'}); add them to lora.target_modules "
        "or use pruning.criterion=taylor"
        for kind, names in LORA_SCORED_BY
        if not adapted & set(names)
    ]


def _validate_distill(cfg: Config) -> list[str]:
    d, errs = cfg.distill, []
    if not 0.0 <= d.alpha <= 1.0:
        errs.append(f"distill.alpha={d.alpha}: must be in [0, 1] (weight of the KL term; 1 = KL alone)")
    if not d.temperature > 0:
        errs.append(f"distill.temperature={d.temperature}: must be > 0 (1 = the teacher's own distribution)")
    if d.top_k < 0:
        errs.append(f"distill.top_k={d.top_k}: must be >= 0 (0 = the whole vocabulary)")
    if d.chunk_tokens < 1:
        errs.append(f"distill.chunk_tokens={d.chunk_tokens}: must be >= 1")
    if not d.teacher:
        errs.append("distill.teacher is empty: use base (the model itself, adapters and masks off) or a model path")
    if d.enabled and "lm_head" in cfg.lora.target_modules:
        errs.append(
            "distill.enabled with lm_head in lora.target_modules: distillation projects hidden states "
            "through the frozen output embedding; remove lm_head from lora.target_modules"
        )
    return errs


def _missing(module: str) -> bool:
    return importlib.util.find_spec(module) is None


def _validate_logging(lg: LoggingConfig, check_environment: bool) -> list[str]:
    bad = [r for r in lg.report_to if r not in REPORT_TO]
    errs = [f"logging.report_to: {r!r} is not one of {', '.join(REPORT_TO)}" for r in bad]
    if "none" in lg.report_to and len(lg.report_to) > 1:
        errs.append(f"logging.report_to={lg.report_to}: none cannot be combined with a logger")
    if not lg.report_to:
        errs.append("logging.report_to is empty: use tensorboard, wandb, [tensorboard, wandb] or none")
    if "wandb" in lg.report_to and check_environment and _missing("wandb"):
        errs.append(f"logging.report_to={','.join(lg.report_to)}: {WANDB_MISSING} (or leave wandb out)")
    if "wandb" in lg.report_to and not lg.project:
        errs.append("logging.project is empty: name the W&B project, e.g. logging.project=lora-prune")
    return errs


def _validate_eval(ev: EvalConfig, check_environment: bool) -> list[str]:
    errs: list[str] = []
    if ev.lm_eval_limit < 0:
        errs.append(f"eval.lm_eval_limit={ev.lm_eval_limit}: must be >= 0 (0 = every example)")
    elif ev.lm_eval_limit >= 1 and ev.lm_eval_limit != int(ev.lm_eval_limit):
        errs.append(f"eval.lm_eval_limit={ev.lm_eval_limit}: a count must be whole (or a fraction below 1)")
    if ev.lm_eval_batch_size < 1:
        errs.append(f"eval.lm_eval_batch_size={ev.lm_eval_batch_size}: must be >= 1")
    if ev.lm_eval_num_fewshot < -1:
        errs.append(f"eval.lm_eval_num_fewshot={ev.lm_eval_num_fewshot}: must be >= 0, or -1 for each task's default")
    if ev.lm_eval_include_path and check_environment and not Path(ev.lm_eval_include_path).is_dir():
        errs.append(f"eval.lm_eval_include_path={ev.lm_eval_include_path}: not a directory of task YAML files")
    if ev.lm_eval_tasks and check_environment and _missing("lm_eval"):
        errs.append(f"eval.lm_eval_tasks={','.join(ev.lm_eval_tasks)}: {LM_EVAL_MISSING} (or leave the key empty)")
    return errs


def _validate_data(d: DataConfig) -> list[str]:
    errs: list[str] = []
    if not d.train and not d.mix:
        errs.append(
            "data.train is empty: set it to a text file (.txt), a record file (.jsonl, .json, .csv, .parquet) "
            "or a save_to_disk directory"
        )
    for i, e in enumerate(d.mix):
        key = f"data.mix[{i}]"
        if not isinstance(e, dict):
            errs.append(f"{key}={e!r}: expected a mapping of {', '.join(_MIX_KEYS)}, e.g. {{path: a.jsonl, weight: 2}}")
            continue
        unknown = [k for k in e if k not in _MIX_KEYS]
        if unknown:
            errs.append(f"{key}: unknown key(s) {unknown} (known: {', '.join(_MIX_KEYS)})")
        if not isinstance(e.get("path"), str) or not e["path"]:
            errs.append(f"{key}.path: set it to a data file or save_to_disk directory")
        if "format" in e and e["format"] not in DATA_FORMATS:
            errs.append(f"{key}.format={e['format']!r}: must be one of {', '.join(DATA_FORMATS)}")
        if not isinstance(e.get("text_field", ""), str):
            errs.append(f"{key}.text_field={e['text_field']!r}: expected a field name")
        w = e.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w > 0:
            errs.append(f"{key}.weight={w!r}: must be a number > 0 (1 = once per epoch, 2 = twice, 0.5 = half)")
    if d.seq_len < 2:
        errs.append(f"data.seq_len={d.seq_len}: must be >= 2")
    if d.num_proc < 1:
        errs.append(f"data.num_proc={d.num_proc}: must be >= 1")
    for key in ("eval_max_tokens", "eval_seq_len"):
        if getattr(d, key) < 0:
            errs.append(f"data.{key}: must be >= 0")
    if d.eval_seq_len == 1:
        errs.append("data.eval_seq_len=1: must be >= 2 (or 0 = data.seq_len)")
    return errs


_BAD = object()  # _coerce's result for a value of the wrong type: the field keeps its default


def _coerce(value: Any, tp: Any, key: str, errs: list[str]) -> Any:
    """Check a YAML value against a dataclass field type (ints are accepted for floats); ``_BAD`` if wrong."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value is False and "off" in choices:  # YAML 1.1 reads a bare off (shrink: off) as false
            value = "off"
        if value not in choices:
            errs.append(f"{key}={value!r}: must be one of {', '.join(map(str, choices))}")
            return _BAD
        return value
    if origin is list and typing.get_origin(typing.get_args(tp)[0]) is dict:  # data.mix: entries checked later
        if not isinstance(value, list):
            errs.append(f"{key}={value!r}: expected a list of mappings, e.g. [{{path: a.jsonl, weight: 2}}]")
            return _BAD
        return value
    if origin is list:
        elem = (typing.get_args(tp) or (str,))[0]
        if isinstance(value, str):  # CLI: lora.target_modules=q_proj,v_proj
            value = [v.strip() for v in value.split(",") if v.strip()]
            if elem is int:
                value = [int(v) if v.lstrip("-").isdigit() else v for v in value]
        ok = isinstance(value, list) and all(isinstance(v, elem) and not isinstance(v, bool) for v in value)
        if not ok:
            errs.append(f"{key}={value!r}: expected a list of {'strings' if elem is str else 'integers'}")
            return _BAD
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
        return _BAD
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
        elif (coerced := _coerce(value, hints[key], full, errs)) is not _BAD:
            setattr(obj, key, coerced)


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


def config_from_dict(data: dict[str, Any], source: str = "config", check_environment: bool = True) -> Config:
    """``check_environment=False`` skips what depends on this machine (optional packages installed, the
    lm-eval task folder present): for reading a finished run's config (tools/compact.py needs neither)."""
    cfg = Config()
    errs: list[str] = []
    _apply(cfg, data, "", errs)
    if isinstance(cfg.output.dir, str) and cfg.output.dir.startswith("~"):  # not a literal ./~ folder
        cfg.output.dir = str(Path(cfg.output.dir).expanduser())
    errs += _validate(cfg, check_environment)  # every rule runs: one error lists every problem
    if errs:
        raise ConfigError(f"{source}: {len(errs)} problem(s):\n  - " + "\n  - ".join(errs))
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    data: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        path = Path(path)
        source = str(path)
        if path.is_dir():
            raise ConfigError(f"--config {path} is a directory; pass the YAML file (e.g. {path}/config.yaml)")
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
