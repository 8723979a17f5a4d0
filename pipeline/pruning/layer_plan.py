"""What one decoder layer keeps under its masks, as indices into the original projections: the one plan that
export (pipeline/export/compact.py) and shrinking in flight (pipeline/train/shrink.py) both cut by."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class Widths:
    """Widths of a layer plan from its index tensors."""

    q_heads: torch.Tensor
    kv_heads: torch.Tensor
    channels: torch.Tensor

    @property
    def num_heads(self) -> int:
        return len(self.q_heads)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_heads)

    @property
    def intermediate_size(self) -> int:
        return len(self.channels)


@dataclass(frozen=True)
class LayerPlan(Widths):
    """What one decoder layer keeps, as indices into the original projections (empty: all pruned)."""

    q_heads: torch.Tensor  # kept query heads, ordered by KV head, the same count per kept KV head
    kv_heads: torch.Tensor
    channels: torch.Tensor
    head_scale: torch.Tensor  # mask value per kept query head: folded into the o_proj columns
    channel_scale: torch.Tensor  # mask value per kept channel: folded into the down_proj columns
    padding: int  # pruned query heads kept at mask 0 so that every kept KV head has the same count


def plan_layer(
    heads: torch.Tensor, channels: torch.Tensor, heads_per_group: int, present: set[int] | None = None
) -> LayerPlan:
    """Kept units of one layer from its mask rows (a unit with mask 0 is pruned). ``present``: the query
    heads a shrunk model still holds (pipeline/train/shrink.py), the only ones that can serve as padding."""
    kept = (heads != 0).tolist()
    counts = [sum(kept[g * heads_per_group : (g + 1) * heads_per_group]) for g in range(len(kept) // heads_per_group)]
    kv = [g for g, c in enumerate(counts) if c]
    per_group = max(counts)
    q: list[int] = []
    for g in kv:
        members = range(g * heads_per_group, (g + 1) * heads_per_group)
        fill = [h for h in members if kept[h]] + [
            h for h in members if not kept[h] and (present is None or h in present)
        ]
        q += sorted(fill[:per_group])
    ch = (channels != 0).nonzero().flatten()
    q_t = torch.tensor(q, dtype=torch.long)
    return LayerPlan(
        q_heads=q_t,
        kv_heads=torch.tensor(kv, dtype=torch.long),
        channels=ch,
        head_scale=heads[q_t].float(),
        channel_scale=channels[ch].float(),
        padding=len(q) - sum(kept),
    )


def unit_rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of the rows/columns of ``units`` that are ``size`` wide each (heads: head_dim); a zero
    unit (-1) reads unit 0, and is zeroed by ``_unit_mask``."""
    return (units.clamp_min(0)[:, None] * size + torch.arange(size)).flatten()
