"""DropLoRA rank dropout: ``y = W x + s B drop_p(A x)``.

A Bernoulli mask on the r-dimensional code between A and B, per token and rank coordinate, kept
values scaled by 1/(1-p). It is a forward pre-hook on ``lora_B``, so it runs on every PEFT LoRA
path that calls ``lora_B(lora_A(x))``, the 4-bit base's included, and it is the identity in eval
mode: the merged adapter is just ``s B A``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from pipeline.errors import ConfigError


def attach_rank_dropout(model: nn.Module, p: float, adapter: str = "default") -> list[RemovableHandle]:
    if not 0.0 < p < 1.0:
        return []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (F.dropout(args[0], p, training=module.training), *args[1:])

    handles = []
    for m in model.modules():
        lora_b = getattr(m, "lora_B", None)
        if isinstance(lora_b, nn.ModuleDict) and adapter in lora_b:
            handles.append(lora_b[adapter].register_forward_pre_hook(hook))
    if not handles:
        raise ConfigError(
            f"lora.rank_dropout={p} but no module of the model carries LoRA: none of lora.target_modules matched "
            "its layer names; list the model's projection names there, or set lora.rank_dropout=0"
        )
    return handles
