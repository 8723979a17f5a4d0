"""What to score: per-module, per-unit importance of heads and channels.

``lora`` (LoRAPrune): with the merged weight ``W' = W + s B A`` and the LoRA gradients, the full
weight gradient is approximated as ``G = s (G_B A + B G_A - G_B G_A)`` (the change of W' under one
unit step of the adapters; ``s`` is kept so that scores stay comparable when modules have
different ranks or alphas). The element score ``|W' * G|`` is summed over each unit's rows
(q, k, v, gate, up) or columns (o, down). Only one module's dense weight exists at a time,
in row chunks; the full base-weight gradient is never formed.

``full_grad`` (LLM-Pruner's element-wise first-order Taylor, the reference): the same
``sum |W' * G|`` per unit with the exact weight gradient ``G = dL/dW``, accumulated over the
step's micro-batches by hooks on every projection (``FullGradients``). It needs the
full-precision base and really materialises one fp32 gradient per projection weight, the memory
cost the LoRA proxy avoids.

Work split under ZeRO-3: all ranks gather each module's (4-bit) weight and adapters and read
the averaged LoRA gradients (collectives, same order everywhere), but only the module's owner
(round-robin over modules) computes its scores; the others contribute zeros to a single
all-reduce of the score vector (see aggregation.py). Each unit's score is thus computed once,
from the global-batch gradient, exactly as a single process would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import bitsandbytes as bnb
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from pipeline.dist import comm as D
from pipeline.model.structure import ATTN, INPUT_UNIT_MODULES, MLP, Structure, decoder_layers, layer_modules

if TYPE_CHECKING:
    from pipeline.pruning.criteria import ModuleCriterion

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


def taylor_module_scores(w: torch.Tensor, g: torch.Tensor, name: str, unit: int) -> torch.Tensor:
    """Per-unit ``sum |W' * dL/dW|`` (LLM-Pruner element-wise), in row chunks like the LoRA proxy."""
    if name in INPUT_UNIT_MODULES:
        v = sum((w[r : r + _ROW_CHUNK] * g[r : r + _ROW_CHUNK]).abs().sum(0) for r in range(0, w.shape[0], _ROW_CHUNK))
    else:
        v = torch.cat(
            [(w[r : r + _ROW_CHUNK] * g[r : r + _ROW_CHUNK]).abs().sum(1) for r in range(0, w.shape[0], _ROW_CHUNK)]
        )
    return v.view(-1, unit).sum(-1)


def full_shape(w: nn.Parameter) -> tuple[int, ...]:
    """The unpartitioned shape of a (ZeRO-3) parameter."""
    return tuple(w.ds_shape) if hasattr(w, "ds_shape") else tuple(w.shape)


class FullGradients:
    """Exact weight gradients of every projection for the ``full_grad`` criterion.

    While armed, a forward hook keeps each projection's input ``x`` and a hook on its output adds
    ``grad_out^T x`` (= dL/dW, with the engine's 1/grad_accum loss scaling) into an fp32 buffer of
    the weight's full shape. Hooks, not ``requires_grad`` on the base weights: the engine keeps
    treating them as frozen, and nothing is accumulated on steps that are not scored. Inputs that
    carry no grad (early layers without adapters) are made to, so every projection gets its gradient.
    """

    def __init__(self, refs: list[ModuleRef]) -> None:
        self.refs = refs
        self.armed = False
        self.grads: list[torch.Tensor | None] = [None] * len(refs)
        self._handles: list[RemovableHandle] = []
        for i, ref in enumerate(refs):
            self._handles.append(ref.module.register_forward_pre_hook(self._pre_hook))
            self._handles.append(ref.module.register_forward_hook(self._post_hook(i)))

    def arm(self, flag: bool) -> None:
        """Accumulate from the next forward on (``True``) or not; buffers are cleared either way."""
        self.armed = flag
        self.grads = [None] * len(self.refs)

    def _pre_hook(self, _module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = args[0]
        if self.armed and torch.is_grad_enabled() and not x.requires_grad:
            return (x.detach().requires_grad_(True), *args[1:])
        return None

    def _post_hook(self, index: int) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], None]:
        def hook(_module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            if not (self.armed and torch.is_grad_enabled() and out.requires_grad):
                return
            x = args[0].detach()

            def accumulate(g_out: torch.Tensor) -> None:
                g = g_out.reshape(-1, g_out.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
                if self.grads[index] is None:
                    self.grads[index] = g
                else:
                    self.grads[index].add_(g)

            out.register_hook(accumulate)

        return hook

    def averaged(self, index: int) -> torch.Tensor:
        """This projection's gradient averaged over ranks (a collective: call on every rank, in order)."""
        g = self.grads[index]
        if g is None:  # no backward reached it; zeros keep the collectives aligned across ranks
            g = torch.zeros(full_shape(base_weight(self.refs[index].module)), device=D.device())
        self.grads[index] = None  # scored once; freed with the caller's reference
        return D.all_reduce_sum(g.to(D.comm_device())).div_(D.world_size())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def owner(index: int) -> int:
    return index % D.world_size()


def module_scores(refs: list[ModuleRef], layout: ScoreLayout, criterion: ModuleCriterion) -> torch.Tensor:
    """Flat per-module scores for this rank's modules (zeros elsewhere); collectives on every rank."""
    flat = torch.zeros(layout.numel, dtype=torch.float64, device=D.comm_device())
    me = D.rank()
    for i, ref in enumerate(refs):
        if criterion.skips_unadapted and not ref.has_lora:
            continue  # no adapter: no gradient proxy for this module (same decision on every rank)
        w = base_weight(ref.module)
        lora = _lora_parts(ref.module) if ref.has_lora else None
        params = [w] if lora is None else [w, lora[0], lora[1]]
        grads = criterion.gradients(i, ref, lora)  # collective for gradient criteria
        with D.gathered(params):  # collective under ZeRO-3
            if owner(i) != me:
                continue
            v = criterion.module_score(dense_weight(w), ref, lora, grads, layout.unit_size(ref.name)).to(flat)
            dst = layout.slice(flat, ref.layer, ref.name)
            units = criterion.ctx.masks.unit_index(ref.layer, ref.name)  # a shrunk layer: its units' places
            if units is None:
                dst.copy_(v)
            else:
                dst.index_copy_(0, units.to(dst.device), v)
    return flat
