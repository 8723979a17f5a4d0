"""Structured masks applied in the forward pass; base weights are never edited during training.

Head masks are kept per query head ([layers, num_heads]) and multiply the o_proj input; a KV
group is pruned by zeroing all its query heads (its k/v rows then feed nothing). Channel masks
([layers, intermediate]) multiply the down_proj input. With the ``taylor`` criterion the masks
require grad, so backward yields dL/dm, the first-order effect of removing each unit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.hooks import RemovableHandle

from pipeline.model.structure import Structure, decoder_layers, layer_modules


class Masks:
    def __init__(self, s: Structure, device: torch.device | str = "cpu") -> None:
        self.s = s
        self.heads = torch.ones(s.num_layers, s.num_heads, device=device)
        self.channels = torch.ones(s.num_layers, s.intermediate_size, device=device)
        self._handles: list[RemovableHandle] = []
        self._bypass = False
        # After a shrink (pipeline/train/shrink.py): per layer, what the cut model still holds (a LayerKeep,
        # original unit indices per projection); the hooks then read the masks at those units. None: all.
        self.kept: list[Any] | None = None
        self._kept_heads: list[torch.Tensor] = []
        self._kept_channels: list[torch.Tensor] = []

    def set_kept(self, keeps: list[Any] | None) -> None:
        self.kept = keeps
        dev = self.heads.device
        self._kept_heads = [] if keeps is None else [k.units("q_proj").to(dev) for k in keeps]
        self._kept_channels = [] if keeps is None else [k.units("gate_proj").to(dev) for k in keeps]

    def unit_index(self, layer: int, module: str) -> torch.Tensor | None:
        """Original unit indices of ``module``'s units in layer ``layer`` of a shrunk model (None: all)."""
        return None if self.kept is None else self.kept[layer].units(module)

    # Unit-level views: what the pruning decisions act on.
    def head_units(self) -> torch.Tensor:
        """[layers, head_units] bool, True = kept."""
        h = self.heads.detach() > 0
        if self.s.head_unit == "kv_group":
            return h.view(self.s.num_layers, self.s.num_kv_heads, self.s.heads_per_group).any(-1)
        return h

    def channel_units(self) -> torch.Tensor:
        return self.channels.detach() > 0

    def set_units(self, head_keep: torch.Tensor, channel_keep: torch.Tensor) -> None:
        if self.s.head_unit == "kv_group":
            head_keep = head_keep.repeat_interleave(self.s.heads_per_group, dim=1)
        with torch.no_grad():
            self.heads.copy_(head_keep.to(self.heads))
            self.channels.copy_(channel_keep.to(self.channels))

    def requires_grad_(self, flag: bool) -> None:
        self.heads.requires_grad_(flag)
        self.channels.requires_grad_(flag)

    def zero_grad(self) -> None:
        self.heads.grad = None
        self.channels.grad = None

    def pruned_params(self) -> int:
        s = self.s
        kept_heads = self.heads.detach().gt(0).sum().item()
        removed_heads = s.num_layers * s.num_heads - kept_heads
        removed_q_o = removed_heads * 2 * s.head_dim * s.hidden_size + removed_heads * s.head_dim * s.attn_bias
        if s.head_unit == "kv_group":
            removed_groups = s.num_layers * s.num_kv_heads - self.head_units().sum().item()
            removed_q_o += removed_groups * (2 * s.head_dim * s.hidden_size + 2 * s.head_dim * s.attn_bias)
        removed_ch = (self.channels.detach() == 0).sum().item() * s.params_per_channel
        return int(removed_q_o + removed_ch)

    def sparsity(self) -> float:
        return self.pruned_params() / self.s.prunable_params

    def attach(self, model: nn.Module) -> None:
        """Register forward pre-hooks on every layer's o_proj and down_proj."""
        self.detach_hooks()
        for i, layer in enumerate(decoder_layers(model)):
            mods = layer_modules(layer)
            self._handles.append(mods["o_proj"].register_forward_pre_hook(self._head_hook(i)))
            self._handles.append(mods["down_proj"].register_forward_pre_hook(self._channel_hook(i)))

    def detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def bypassed(self) -> Iterator[None]:
        """Forwards inside run the unmasked model (the distillation teacher)."""
        self._bypass = True
        try:
            yield
        finally:
            self._bypass = False

    def _head_hook(self, layer: int):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            if self._bypass:
                return args
            x = args[0]
            m = self.heads[layer]
            if self._kept_heads:
                m = m.index_select(0, self._kept_heads[layer])
            m = m.repeat_interleave(self.s.head_dim).to(x.dtype)
            return (x * m, *args[1:])

        return hook

    def _channel_hook(self, layer: int):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            if self._bypass:
                return args
            x = args[0]
            m = self.channels[layer]
            if self._kept_channels:
                m = m.index_select(0, self._kept_channels[layer])
            return (x * m.to(x.dtype), *args[1:])

        return hook

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"heads": self.heads.detach().cpu().clone(), "channels": self.channels.detach().cpu().clone()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for key, t in (("heads", self.heads), ("channels", self.channels)):
            if key not in sd or sd[key].shape != t.shape:
                got = tuple(sd[key].shape) if key in sd else "missing"
                raise ValueError(f"masks: {key} has shape {got}, model needs {tuple(t.shape)}")
        with torch.no_grad():
            self.heads.copy_(sd["heads"])
            self.channels.copy_(sd["channels"])

    def save(self, path: str | Path) -> None:
        save_file(self.state_dict(), str(path))

    @classmethod
    def load(cls, s: Structure, path: str | Path) -> Masks:
        m = cls(s)
        m.load_state_dict(load_file(str(path)))
        return m
