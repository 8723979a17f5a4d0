"""Prunable structure read from ``model.config``: attention heads (GQA-aware) and MLP channels.

A unit is what one mask entry removes. Heads are masked at the o_proj input, channels at the
down_proj input; the scores of a unit gather the rows/columns of every projection it owns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.errors import InputError

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
OUTPUT_UNIT_MODULES = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # units are rows
INPUT_UNIT_MODULES = ("o_proj", "down_proj")  # units are columns


class StructureError(InputError):
    pass


@dataclass(frozen=True)
class Structure:
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    head_unit: str  # kv_group | query
    attn_bias: bool

    def to_dict(self) -> dict[str, int | str]:
        """Dimensions under their transformers config names (the run summary's ``structure``)."""
        return {
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "head_unit": self.head_unit,
        }

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def head_units(self) -> int:
        """Head units per layer."""
        return self.num_kv_heads if self.head_unit == "kv_group" else self.num_heads

    @property
    def params_per_head_unit(self) -> int:
        h, d = self.hidden_size, self.head_dim
        if self.head_unit == "kv_group":
            # q rows and o columns of its query heads, k and v rows of its KV head.
            return self.heads_per_group * d * h * 2 + 2 * d * h + (self.heads_per_group + 2) * d * self.attn_bias
        return 2 * d * h + d * self.attn_bias

    @property
    def params_per_channel(self) -> int:
        return 3 * self.hidden_size

    @property
    def prunable_params(self) -> int:
        """Attention + MLP projection weights (and q/k/v biases) over all layers."""
        h, d = self.hidden_size, self.head_dim
        attn = 2 * self.num_heads * d * h + 2 * self.num_kv_heads * d * h
        attn += (self.num_heads + 2 * self.num_kv_heads) * d * self.attn_bias
        return self.num_layers * (attn + self.intermediate_size * self.params_per_channel)


def structure_from_config(config: object, head_unit: str = "kv_group") -> Structure:
    """Read dimensions from a transformers config (Llama, Mistral, Qwen2 and alike)."""
    get = lambda k, default=None: getattr(config, k, default)  # noqa: E731
    model_type = get("model_type", "?")
    needed = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")
    missing = [k for k in needed if get(k) is None]
    if missing:
        raise StructureError(
            f"model type {model_type!r}: config lacks {missing}; only decoder-only models with "
            "Llama-style attention and gated MLP (Llama, Mistral, Qwen2) have known prunable structure"
        )
    n_heads = int(get("num_attention_heads"))
    n_kv = int(get("num_key_value_heads") or n_heads)
    head_dim = int(get("head_dim") or get("hidden_size") // n_heads)
    if n_heads % n_kv:
        raise StructureError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
    if isinstance(get("intermediate_size"), list) or get("layer_types_widths"):
        raise StructureError("per-layer widths in the input model are not supported")
    bias = bool(get("attention_bias", False)) or model_type.startswith("qwen2")
    return Structure(
        model_type=model_type,
        num_layers=int(get("num_hidden_layers")),
        hidden_size=int(get("hidden_size")),
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate_size=int(get("intermediate_size")),
        head_unit=head_unit,
        attn_bias=bias,
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a (PEFT-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise StructureError(f"{type(base).__name__}: no model.layers; architecture has no known prunable structure")
    return layers


def layer_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """The seven projections of one decoder layer (LoRA-wrapped or plain)."""
    attn = getattr(layer, "self_attn", None)
    mlp = getattr(layer, "mlp", None)
    mods: dict[str, nn.Module] = {}
    for name in ATTN:
        mods[name] = getattr(attn, name, None)
    for name in MLP:
        mods[name] = getattr(mlp, name, None)
    missing = [k for k, v in mods.items() if v is None]
    if missing:
        raise StructureError(
            f"{type(layer).__name__}: missing {missing}; expected self_attn.{{q,k,v,o}}_proj and "
            "mlp.{gate,up,down}_proj (Llama/Mistral/Qwen2 layout)"
        )
    return mods


def discover(model: nn.Module, head_unit: str = "kv_group") -> Structure:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    s = structure_from_config(base.config, head_unit)
    layers = decoder_layers(model)
    if len(layers) != s.num_layers:
        raise StructureError(f"config says {s.num_layers} layers, model has {len(layers)}")
    for layer in layers:
        layer_modules(layer)
    return s


def check_layout(config: object) -> None:
    """Build the model on the meta device (no memory, no weights read) and check its decoder-layer layout,
    so an architecture without the known prunable structure (e.g. BERT) is refused before any loading."""
    from transformers import AutoModelForCausalLM

    model_type = getattr(config, "model_type", "?")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as e:
        raise StructureError(f"model type {model_type!r}: transformers has no causal LM for it ({e})") from None
    layers = decoder_layers(model)
    if len(layers):
        layer_modules(layers[0])
