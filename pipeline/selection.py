"""How many units to cut and which: one decision on identical scores on every rank.

Each unit kind (head units, MLP channels) is pruned to the scheduled fraction of its units, so
attention and MLP reach the same sparsity and the parameter fraction removed equals the target
within one unit of each kind. ``global`` ranks a kind's units across all layers (no layer loses
more than ``max_layer_sparsity`` of them, and each keeps at least one); ``uniform`` removes the
same count in every layer (and, for query heads, the same count in every KV group), which keeps
a stock architecture on export. Pruned units never come back: they are ranked first.
"""

from __future__ import annotations

import math

import torch


def _rank_within_rows(scores: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(scores, dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1]).expand_as(order).contiguous())
    return ranks


def _prune_lowest_per_row(scores: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    s = scores.masked_fill(~alive, -math.inf)
    already = (~alive).sum(-1, keepdim=True)
    k_row = torch.clamp(already, min=k)
    return _rank_within_rows(s) >= k_row


def select_global(
    scores: torch.Tensor, alive: torch.Tensor, fraction: float, max_layer_sparsity: float
) -> torch.Tensor:
    """Keep-mask [layers, units] after removing ``round(fraction * total)`` units across layers."""
    layers, units = scores.shape
    cap = min(math.floor(max_layer_sparsity * units + 1e-9), units - 1)
    n_prune = max(round(fraction * layers * units), int((~alive).sum()))
    n_prune = min(n_prune, cap * layers)
    s = scores.masked_fill(~alive, -math.inf)
    protected = _rank_within_rows(s) >= cap  # the best units of each layer are never cut
    s = s.masked_fill(protected, math.inf)
    order = torch.argsort(s.flatten(), stable=True)
    keep = torch.ones(layers * units, dtype=torch.bool)
    keep[order[:n_prune]] = False
    return keep.view(layers, units)


def select_uniform(scores: torch.Tensor, alive: torch.Tensor, fraction: float, groups: int = 1) -> torch.Tensor:
    """Keep-mask with the same number removed in every layer (and every one of ``groups`` groups)."""
    layers, units = scores.shape
    per_group = units // groups
    k = min(round(fraction * per_group), per_group - 1)
    keep = _prune_lowest_per_row(scores.view(layers * groups, per_group), alive.view(layers * groups, per_group), k)
    return keep.view(layers, units)


def decide(
    head_scores: torch.Tensor,
    channel_scores: torch.Tensor,
    head_alive: torch.Tensor,
    channel_alive: torch.Tensor,
    fraction: float,
    scope: str,
    max_layer_sparsity: float,
    query_groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (head keep-mask, channel keep-mask) at unit granularity."""
    if scope == "global":
        return (
            select_global(head_scores, head_alive, fraction, max_layer_sparsity),
            select_global(channel_scores, channel_alive, fraction, max_layer_sparsity),
        )
    return (
        select_uniform(head_scores, head_alive, fraction, groups=query_groups),
        select_uniform(channel_scores, channel_alive, fraction),
    )
