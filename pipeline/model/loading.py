"""Load a Hugging Face causal LM with a frozen (optionally NF4) base and PEFT LoRA adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations import HfDeepSpeedConfig

from pipeline.config.schema import Config
from pipeline.model.source import ModelError, resolve_model_dir
from pipeline.pruning.rank_dropout import attach_rank_dropout

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}  # model.dtype names (compact --dtype too)


NF4_BLOCKSIZE = 64  # bitsandbytes' Params4bit default, which transformers' 4-bit loader uses


def nf4_roundtrip(w: torch.Tensor, dtype: torch.dtype, double_quant: bool) -> torch.Tensor:
    """The weight an NF4 run trained against: quantized as transformers' 4-bit loader does, dequantized."""
    packed, state = bnb.functional.quantize_4bit(
        w.to(dtype).contiguous(),
        blocksize=NF4_BLOCKSIZE,
        compress_statistics=double_quant,
        quant_type="nf4",
        quant_storage=dtype,
    )
    return bnb.functional.dequantize_4bit(packed, state)


def resolve_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The config name of ``dtype`` (``model.dtype`` values), as summary.json records the compute dtype."""
    return next(k for k, v in DTYPES.items() if v == dtype)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(path)


def load_model(
    cfg: Config, ds_config: dict[str, Any], model_dir: str | Path | None = None
) -> tuple[PeftModel, HfDeepSpeedConfig]:
    """Returns the PEFT model and the HfDeepSpeedConfig, which the caller keeps alive.

    The HfDeepSpeedConfig must exist before ``from_pretrained`` so that transformers knows about
    ZeRO-3 (unquantized weights are then created partitioned under ``zero.Init``; quantized ones
    are loaded whole on each rank and partitioned by ``deepspeed.initialize``). ``model_dir`` is
    ``cfg.model.path`` resolved (``model_source.resolve_model_dir``), which the trainer has done already.
    """
    if model_dir is None:
        model_dir = resolve_model_dir(cfg.model.path)
    hf_ds = HfDeepSpeedConfig(ds_config)
    model = load_frozen(model_dir, cfg)
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input grads, unlike prepare_model_for_kbit_training,
        # which would also upcast and break the quant-storage dtype.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in cfg.lora.target_modules if m not in present]
    if missing:
        raise ModelError(
            f"lora.target_modules: {missing} not found in {cfg.model.path}; modules include "
            f"{sorted(n for n in present if n.endswith('proj'))}"
        )
    peft_cfg = PeftLoraConfig(
        r=cfg.lora.rank_pruning.init_r if cfg.lora.rank_pruning.enabled else cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_cfg)
    attach_rank_dropout(model, cfg.lora.rank_dropout)
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name
    return model, hf_ds


def load_frozen(model_dir: str | Path, cfg: Config) -> PreTrainedModel:
    """The base model as training reads it: ``model.dtype``, NF4 when ``model.quantization=nf4``, no
    KV cache. Under ZeRO-3 an HfDeepSpeedConfig must be alive (see load_model)."""
    dtype = resolve_dtype(cfg.model.dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if cfg.model.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=cfg.model.double_quant,
            # ZeRO-3 partitions parameters of one dtype; the packed 4-bit bytes are stored as that dtype.
            bnb_4bit_quant_storage=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    # Without a KV cache transformers builds the attention mask from position_ids, which restart
    # at every packed document, so packed documents do not attend to each other in training.
    model.config.use_cache = False
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place on the first
            # eval-mode forward and flags the quant state; under ZeRO-3 the repacked gathered copy
            # is thrown away while the flag stays, so every later forward reads garbage.
            mod.support_avx512bf16_for_cpu = False
    for p in model.parameters():
        p.requires_grad = False
    return model


def model_config(model_dir: str | Path) -> Any:
    return AutoConfig.from_pretrained(model_dir)
