"""DeepSpeed config: load the JSON, resolve ``"auto"`` from the run config, check the batch identity.

Raw ``deepspeed.initialize`` rejects ``"auto"``, so every one is filled here; an explicit value
that disagrees with the run config is an error rather than a silent override.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config.schema import Config
from pipeline.errors import InputError, read_json
from pipeline.model.loading import resolve_dtype


class DeepSpeedConfigError(InputError):
    pass


def _set(d: dict[str, Any], key: str, value: Any, ours: str, errs: list[str], where: str) -> None:
    cur = d.get(key, "auto")
    if cur == "auto":
        d[key] = value
    elif cur != value:
        errs.append(f'{where}: {key}={cur!r} but {ours}={value!r}; set it to "auto" or make them agree')


def _find_auto(node: Any, path: str, found: list[str]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _find_auto(v, f"{path}.{k}" if path else k, found)
    elif node == "auto":
        found.append(path)


def resolve(cfg: Config, world_size: int) -> dict[str, Any]:
    path = Path(cfg.deepspeed.config)
    d = read_json(path, f"deepspeed.config={path} (configs live in ds_configs/)", DeepSpeedConfigError)
    if not isinstance(d, dict):
        raise DeepSpeedConfigError(
            f"deepspeed.config={path}: the top level is a JSON {type(d).__name__}, not an object of DeepSpeed "
            "settings; start from ds_configs/zero3_cpu.json"
        )
    errs: list[str] = []
    where = str(path)
    zero = d.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage != 3:
        errs.append(
            f"{where}: zero_optimization.stage={stage}: the pipeline runs on ZeRO-3 only (its gathers, partitioned "
            'base and checkpoints assume it); set "zero_optimization": {"stage": 3, ...}'
        )
        zero = zero if isinstance(zero, dict) else {}
    t = cfg.train
    _set(d, "train_micro_batch_size_per_gpu", t.micro_batch_size, "train.micro_batch_size", errs, where)
    _set(d, "gradient_accumulation_steps", t.grad_accum, "train.grad_accum", errs, where)
    _set(
        d,
        "train_batch_size",
        t.micro_batch_size * t.grad_accum * world_size,
        f"train.micro_batch_size x train.grad_accum x world size ({world_size})",
        errs,
        where,
    )
    _set(d, "gradient_clipping", t.max_grad_norm, "train.max_grad_norm", errs, where)
    dtype = resolve_dtype(cfg.model.dtype)
    if dtype == torch.float16 and not torch.cuda.is_available():
        errs.append(
            "model.dtype=fp16 without a GPU: DeepSpeed's fp16 loss scaling runs on GPUs only; use "
            "model.dtype=fp32 or bf16 (or auto) on CPU"
        )
    for section, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        sec = d.setdefault(section, {"enabled": "auto"})
        _set(sec, "enabled", dtype == dt, f"model.dtype ({cfg.model.dtype})", errs, f"{where} {section}")
    opt = d.get("optimizer")
    if isinstance(opt, dict):
        params = opt.setdefault("params", {})
        _set(params, "lr", t.lr, "train.lr", errs, f"{where} optimizer.params")
        _set(params, "weight_decay", t.weight_decay, "train.weight_decay", errs, f"{where} optimizer.params")
    if "scheduler" in d:
        errs.append(f"{where}: remove the scheduler section; the pipeline sets the LR schedule from train.*")
    if cfg.model.quantization == "nf4" and zero.get("stage", 0) == 3 and zero.get("offload_param"):
        errs.append(f"{where}: zero_optimization.offload_param does not support 4-bit base weights; remove it")
    left: list[str] = []
    _find_auto(d, "", left)
    errs += [f'{where}: {k}="auto" cannot be resolved by the pipeline; give a value' for k in left]
    if errs:
        raise DeepSpeedConfigError("DeepSpeed config problem(s):\n  - " + "\n  - ".join(errs))
    return d
