"""What to score: per-module, per-unit importance of heads and channels.

``lora`` (LoRAPrune): with the merged weight ``W' = W + s B A`` and the LoRA gradients, the full
weight gradient is approximated as ``G = s (G_B A + B G_A - G_B G_A)`` (the change of W' under one
unit step of the adapters; ``s`` is kept so that scores stay comparable when modules have
different ranks or alphas). The element score ``|W' * G|`` is summed over each unit's rows
(q, k, v, gate, up) or columns (o, down). Only one module's dense weight exists at a time,
in row chunks; the full base-weight gradient is never formed.

Work split under ZeRO-3: all ranks gather each module's (4-bit) weight and adapters and read
the averaged LoRA gradients (collectives, same order everywhere), but only the module's owner
(round-robin over modules) computes its scores; the others contribute zeros to a single
all-reduce of the score vector (see aggregation.py). Each unit's score is thus computed once,
from the global-batch gradient, exactly as a single process would.
"""

from __future__ import annotations

from dataclasses import dataclass

import bitsandbytes as bnb
import torch
from torch import nn

from . import distributed as D
from .structure import ATTN, INPUT_UNIT_MODULES, MLP, Structure, decoder_layers, layer_modules

MODULES = ATTN + MLP
_ROW_CHUNK = 4096  # rows of a projection scored at once: bounds the dense transient


@dataclass(frozen=True)
class ModuleRef:
    layer: int
    name: str
    module: nn.Module

    @property
    def has_lora(self) -> bool:
        return hasattr(self.module, "lora_A") and "default" in self.module.lora_A


def module_refs(model: nn.Module) -> list[ModuleRef]:
    return [
        ModuleRef(i, name, mod)
        for i, layer in enumerate(decoder_layers(model))
        for name, mod in layer_modules(layer).items()
    ]


class ScoreLayout:
    """Offsets of each (layer, module) vector in the flat score tensor that is all-reduced."""

    def __init__(self, s: Structure) -> None:
        self.s = s
        self.lengths = {
            "q_proj": s.num_heads,
            "k_proj": s.num_kv_heads,
            "v_proj": s.num_kv_heads,
            "o_proj": s.num_heads,
            "gate_proj": s.intermediate_size,
            "up_proj": s.intermediate_size,
            "down_proj": s.intermediate_size,
        }
        self.per_layer = sum(self.lengths.values())
        self.offsets: dict[str, int] = {}
        off = 0
        for name in MODULES:
            self.offsets[name] = off
            off += self.lengths[name]
        self.numel = self.per_layer * s.num_layers

    def slice(self, flat: torch.Tensor, layer: int, name: str) -> torch.Tensor:
        start = layer * self.per_layer + self.offsets[name]
        return flat[start : start + self.lengths[name]]

    def unit_size(self, name: str) -> int:
        """Rows/columns per entry: head_dim for attention modules, 1 for MLP channels."""
        return self.s.head_dim if name in ATTN else 1


def base_weight(module: nn.Module) -> nn.Parameter:
    return module.base_layer.weight if hasattr(module, "base_layer") else module.weight


def dense_weight(w: nn.Parameter) -> torch.Tensor:
    """The weight the forward pass uses, in fp32; NF4 weights are dequantized (call while gathered)."""
    if isinstance(w, bnb.nn.Params4bit):
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    return w.data.float()


def _lora_parts(module: nn.Module) -> tuple[nn.Parameter, nn.Parameter, float]:
    return module.lora_A["default"].weight, module.lora_B["default"].weight, float(module.scaling["default"])


def _reduce_units(e: torch.Tensor, name: str, unit: int) -> torch.Tensor:
    """Element scores [d_out, d_in] -> per-unit sums."""
    v = e.sum(0) if name in INPUT_UNIT_MODULES else e.sum(1)
    return v.view(-1, unit).sum(-1)


def lora_module_scores(
    w: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    ga: torch.Tensor,
    gb: torch.Tensor,
    s: float,
    name: str,
    unit: int,
    reduce: str = "element",
) -> torch.Tensor:
    """Per-unit score with the LoRA gradient proxy, computed in row chunks.

    ``element``: ``sum |W' * G|`` (LoRAPrune, LLM-Pruner element-wise); ``vector``:
    ``|sum W' * G|``, the first-order loss change of zeroing the unit's weights in this module
    (on o/down columns, the LoRA estimate of the mask gradient dL/dm).
    """
    a, b, ga, gb = (t.float() for t in (a, b, ga, gb))
    per_elem_rows = []
    for r0 in range(0, w.shape[0], _ROW_CHUNK):
        rows = slice(r0, r0 + _ROW_CHUNK)
        merged = w[rows] + s * (b[rows] @ a)
        grad = s * (gb[rows] @ a + b[rows] @ ga - gb[rows] @ ga)
        e = merged * grad
        if reduce == "element":
            e = e.abs()
        per_elem_rows.append(e.sum(0) if name in INPUT_UNIT_MODULES else e.sum(1))
    v = torch.stack(per_elem_rows).sum(0) if name in INPUT_UNIT_MODULES else torch.cat(per_elem_rows)
    v = v.view(-1, unit).sum(-1)
    return v if reduce == "element" else v.abs()


def magnitude_module_scores(w: torch.Tensor, name: str, unit: int) -> torch.Tensor:
    """Per-unit L2 norm of the (merged) weight."""
    return _reduce_units(w.pow(2), name, unit).sqrt()


def owner(index: int) -> int:
    return index % D.world_size()


def module_scores(refs: list[ModuleRef], layout: ScoreLayout, criterion: str, reduce: str = "element") -> torch.Tensor:
    """Flat per-module scores for this rank's modules (zeros elsewhere); collectives on every rank."""
    flat = torch.zeros(layout.numel, dtype=torch.float64, device=D.comm_device())
    me = D.rank()
    for i, ref in enumerate(refs):
        if criterion == "lora" and not ref.has_lora:
            continue  # no adapter: no gradient proxy for this module (same decision on every rank)
        w = base_weight(ref.module)
        params = [w]
        if ref.has_lora:
            a, b, s = _lora_parts(ref.module)
            params += [a, b]
        grads = None
        if criterion == "lora":
            grads = (D.full_grad(a), D.full_grad(b))  # collective under ZeRO-3
        with D.gathered(params):  # collective under ZeRO-3
            if owner(i) != me:
                continue
            dense = dense_weight(w)
            unit = layout.unit_size(ref.name)
            if criterion == "lora":
                v = lora_module_scores(dense, a.data, b.data, grads[0], grads[1], s, ref.name, unit, reduce)
            else:
                if ref.has_lora:
                    dense = dense + s * (b.data.float() @ a.data.float())
                v = magnitude_module_scores(dense, ref.name, unit)
            layout.slice(flat, ref.layer, ref.name).copy_(v.to(flat))
    return flat
