"""transformers model of the Nemotron-NAS (DeciLM) layout (see configuration_decilm.py).

Each attention block is transformers' Llama attention built from a per-layer view of the config
(its KV-head count), with q/k/v biases from ``qkv_bias`` and an o_proj bias from
``attention_bias``; each MLP block is the Llama MLP at the layer's ``intermediate_size``. A
``no_op`` block and its norm are absent, as in vLLM. Attention blocks number their KV-cache slots
consecutively, so a cache's first slot belongs to the first layer that has attention. Imports only
torch and transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlamaForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm

from .configuration_decilm import DeciLMConfig


class _LayerView:
    """Read-through view of the model config with one layer's values (so later changes to the model
    config, e.g. the attention implementation, reach every layer)."""

    def __init__(self, config: Any, values: dict[str, Any]) -> None:
        self.__dict__["_config"], self.__dict__["_values"] = config, values

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_config", "_values"):
            raise AttributeError(name)
        values = self.__dict__["_values"]
        return values[name] if name in values else getattr(self.__dict__["_config"], name)


class DeciLMDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DeciLMConfig, layer_idx: int, cache_idx: int) -> None:
        super().__init__()
        block = config.block_configs[layer_idx]
        self.attn_no_op, self.ffn_no_op = bool(block.attention.no_op), bool(block.ffn.no_op)
        view = _LayerView(config, {**config.layer_widths(layer_idx), "attention_bias": config.qkv_bias})
        if not self.attn_no_op:
            self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.self_attn = LlamaAttention(view, cache_idx)
            attn = self.self_attn
            attn.o_proj = nn.Linear(attn.o_proj.in_features, config.hidden_size, bias=config.attention_bias)
        if not self.ffn_no_op:
            self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
            self.mlp = LlamaMLP(view)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if not self.attn_no_op:
            attn, _ = self.self_attn(
                hidden_states=self.input_layernorm(hidden_states),
                attention_mask=attention_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            hidden_states = hidden_states + attn
        if not self.ffn_no_op:
            hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states


class DeciLMForCausalLM(LlamaForCausalLM):
    """Llama's embeddings, rotary, final norm, head and forward, with the layers of block_configs.

    The stock layers built by ``LlamaForCausalLM.__init__`` are replaced; under ``from_pretrained``
    that first build happens on the meta device and costs nothing.
    """

    config_class = DeciLMConfig
    _no_split_modules = ("DeciLMDecoderLayer",)

    def __init__(self, config: DeciLMConfig) -> None:
        super().__init__(config)
        layers, cache_idx = [], 0
        for i in range(config.num_hidden_layers):
            layers.append(DeciLMDecoderLayer(config, i, cache_idx))
            cache_idx += not layers[-1].attn_no_op
        self.model.layers = nn.ModuleList(layers)
        self.post_init()


__all__ = ["DeciLMForCausalLM"]
