"""Llama, Mistral and Qwen2 with per-layer attention and MLP widths (structured pruning at global scope).

The exporter (``pipeline/export.py``) copies this file next to a compacted model whose layers differ in
width and points ``auto_map`` in its config.json here, so the model loads with
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``. It therefore imports only torch
and transformers: it runs where this package is not installed.

Each decoder layer is the stock transformers layer built from a per-layer view of the config, so the
forward pass, caches and attention kernels are the library's own. The global ``num_attention_heads``,
``num_key_value_heads`` and ``intermediate_size`` hold the per-layer maxima (an upper bound for code
that sizes buffers from them); ``layer_*`` lists hold the real widths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# Per-layer config attribute -> list field of the pruned config.
LAYER_FIELDS = {
    "num_attention_heads": "layer_num_attention_heads",
    "num_key_value_heads": "layer_num_key_value_heads",
    "intermediate_size": "layer_intermediate_size",
}


class LayerConfig:
    """Read-through view of the model config with one layer's widths.

    A view rather than a copy: settings changed on the model config later (e.g. the attention
    implementation) reach every layer, as with a stock model.
    """

    def __init__(self, config: Any, widths: dict[str, int]) -> None:
        self.__dict__["_config"] = config
        self.__dict__["_widths"] = widths

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_config", "_widths"):
            raise AttributeError(name)  # copy/pickle probe dunders before __dict__ is filled
        widths = self.__dict__["_widths"]
        return widths[name] if name in widths else getattr(self.__dict__["_config"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._widths:
            raise AttributeError(f"{name} is fixed per layer by the checkpoint's layer_* lists")
        setattr(self._config, name, value)


class _LayerConfigs(Sequence):
    """``config.per_layer_config`` for transformers' cache and rope helpers (static KV cache shapes)."""

    def __init__(self, config: Any) -> None:
        self._config = config

    def __len__(self) -> int:
        return self._config.num_hidden_layers

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, str):  # a layer type: widths do not vary by type here
            return self._config
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._config.layer_config(index)


@dataclass(kw_only=True, repr=False)
class _PerLayerWidths:
    """Fields and checks shared by the three config classes (a dataclass mixin, like the configs)."""

    base_model_type: str = ""
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        n = self.num_hidden_layers
        for attr, field in LAYER_FIELDS.items():
            values = getattr(self, field)
            if values is None:  # a plain config: every layer at the global width
                values = [getattr(self, attr)] * n
            values = [int(v) for v in values]
            if len(values) != n or min(values) < 1:
                raise ValueError(f"{field}={values}: needs {n} positive entries (one per layer)")
            setattr(self, field, values)
            # The global value is the widest layer: an upper bound for code that reads it.
            setattr(self, attr, max(values))
        for i, (q, kv) in enumerate(zip(self.layer_num_attention_heads, self.layer_num_key_value_heads, strict=True)):
            if q % kv:
                raise ValueError(f"layer {i}: {q} attention heads is not a multiple of {kv} key/value heads")
        if not self.base_model_type:
            self.base_model_type = self.model_type.removeprefix("pruned_")

    def validate(self) -> None:
        """The stock config's validators (run by save_pretrained) but its architecture check, which
        for Llama requires hidden_size % num_attention_heads == 0 even with an explicit head_dim;
        the per-layer widths are checked in __post_init__ instead."""
        for validator in getattr(type(self), "__class_validators__", ()):
            if validator.__name__ != "validate_architecture":
                validator(self)

    def layer_config(self, index: int) -> LayerConfig:
        return LayerConfig(self, {attr: getattr(self, field)[index] for attr, field in LAYER_FIELDS.items()})

    @property
    def per_layer_config(self) -> _LayerConfigs:
        return _LayerConfigs(self)


class PrunedLlamaConfig(_PerLayerWidths, LlamaConfig):
    model_type = "pruned_llama"


class PrunedMistralConfig(_PerLayerWidths, MistralConfig):
    model_type = "pruned_mistral"


class PrunedQwen2Config(_PerLayerWidths, Qwen2Config):
    model_type = "pruned_qwen2"


class _PerLayerModel:
    """Replaces the stock decoder layers (built at the global width) with per-layer-width ones.

    Rebuilding after the stock ``__init__`` keeps everything else (embeddings, norm, rotary, head,
    forward) the library's own. Under ``from_pretrained`` the first build happens on the meta
    device and costs nothing; ``from_config`` builds the stock layers once and discards them.
    """

    def _build_per_layer(self) -> None:
        config = self.config
        layer_cls = type(self.model.layers[0])
        self.model.layers = nn.ModuleList(layer_cls(config.layer_config(i), i) for i in range(config.num_hidden_layers))
        self.post_init()  # initialise the new layers and refresh the model's static properties


class PrunedLlamaForCausalLM(_PerLayerModel, LlamaForCausalLM):
    config_class = PrunedLlamaConfig

    def __init__(self, config: PrunedLlamaConfig) -> None:
        super().__init__(config)
        self._build_per_layer()


class PrunedMistralForCausalLM(_PerLayerModel, MistralForCausalLM):
    config_class = PrunedMistralConfig

    def __init__(self, config: PrunedMistralConfig) -> None:
        super().__init__(config)
        self._build_per_layer()


class PrunedQwen2ForCausalLM(_PerLayerModel, Qwen2ForCausalLM):
    config_class = PrunedQwen2Config

    def __init__(self, config: PrunedQwen2Config) -> None:
        super().__init__(config)
        self._build_per_layer()


# base model_type -> (config class, model class): what the exporter writes into auto_map.
ARCHITECTURES: dict[str, tuple[type, type]] = {
    "llama": (PrunedLlamaConfig, PrunedLlamaForCausalLM),
    "mistral": (PrunedMistralConfig, PrunedMistralForCausalLM),
    "qwen2": (PrunedQwen2Config, PrunedQwen2ForCausalLM),
}
