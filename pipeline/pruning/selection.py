"""How many units to cut and which: one decision on identical scores on every rank.

Each unit kind (head units, MLP channels) is pruned to the scheduled fraction of its units, so
attention and MLP reach the same sparsity and the parameter fraction removed equals the target
within one unit of each kind. ``global`` ranks a kind's units across all layers (no layer loses
more than ``max_layer_sparsity`` of them, and each keeps at least one); ``uniform`` removes the
same count in every layer (and, for query heads, the same count in every KV group), which keeps
a stock architecture on export. Pruned units never come back: they are ranked first.

Serving constraints (``WidthRules``): ``round_to`` keeps a multiple of that many MLP channels per
layer (or all of them); the global ranking then cuts blocks of channels, so the total is within
one block of the target. ``kv_heads_multiple_of`` keeps the same number of KV heads in every layer,
a multiple of it (so the Nemotron-NAS export needs no zero heads and tensor parallelism of that size
divides every layer); the MLP channels then make up the difference to the parameter target, and
both kinds ramp in proportion to the schedule so that they reach their final counts together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class WidthRules:
    round_to: int = 1  # MLP channels kept per layer: a multiple of this, or all
    kv_heads_multiple_of: int = 0  # 0: free; else the same KV heads in every layer, a multiple of this
    target: float = 0.0  # the final sparsity (the schedule's end), for the channel make-up
    head_unit_params: int = 0
    channel_params: int = 0


AUTO_ROUND_TO_MAX = 64  # channels per block on real models: measured faster to serve, same quality (README)
AUTO_ROUND_TO_BLOCKS = 8  # ... but at least this many blocks per layer, so small models keep a fine grain


def auto_round_to(intermediate_size: int) -> int:
    """``pruning.round_to=0`` (auto): the largest power of two <= 64 that leaves at least 8 blocks per layer."""
    r = 1
    while r * 2 <= AUTO_ROUND_TO_MAX and r * 2 * AUTO_ROUND_TO_BLOCKS <= intermediate_size:
        r *= 2
    return r


def kept_kv_heads(kv_heads: int, fraction: float, multiple: int) -> int:
    """KV heads every layer keeps at ``fraction`` under ``kv_heads_multiple_of``: the multiple nearest
    ``(1 - fraction) * kv_heads``, at least one multiple, at most all heads."""
    return min(kv_heads, max(multiple, multiple * round((1 - fraction) * kv_heads / multiple)))


def channel_fraction_at_target(heads: int, channels: int, rules: WidthRules) -> float:
    """Fraction of channels to cut so that, with heads at ``kept_kv_heads``, the prunable parameters
    cut equal the target (negative: the heads alone overshoot)."""
    pruned_heads = heads - kept_kv_heads(heads, rules.target, rules.kv_heads_multiple_of)
    total = heads * rules.head_unit_params + channels * rules.channel_params
    return (rules.target * total - pruned_heads * rules.head_unit_params) / (channels * rules.channel_params)


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


def prune_counts(units: int, round_to: int) -> list[int]:
    """Counts a layer may lose so that it keeps a multiple of ``round_to`` units, or all of them."""
    first = units % round_to
    return [0] + [c for c in range(first or round_to, units, round_to)]


def _nearest_count(k: int, units: int, round_to: int, cap: int) -> int:
    allowed = [c for c in prune_counts(units, round_to) if c <= cap]
    return min(allowed, key=lambda c: (abs(c - k), c))


def _layer_cap(units: int, max_layer_sparsity: float) -> int:
    return min(math.floor(max_layer_sparsity * units + 1e-9), units - 1)


def select_global(
    scores: torch.Tensor, alive: torch.Tensor, fraction: float, max_layer_sparsity: float, round_to: int = 1
) -> torch.Tensor:
    """Keep-mask [layers, units] after removing ``round(fraction * total)`` units across layers."""
    layers, units = scores.shape
    cap = _layer_cap(units, max_layer_sparsity)
    n_prune = max(round(fraction * layers * units), int((~alive).sum()))
    s = scores.masked_fill(~alive, -math.inf)
    if round_to > 1:
        return _select_global_blocks(s, n_prune, cap, round_to)
    n_prune = min(n_prune, cap * layers)
    protected = _rank_within_rows(s) >= cap  # the best units of each layer are never cut
    s = s.masked_fill(protected, math.inf)
    order = torch.argsort(s.flatten(), stable=True)
    keep = torch.ones(layers * units, dtype=torch.bool)
    keep[order[:n_prune]] = False
    return keep.view(layers, units)


def _select_global_blocks(s: torch.Tensor, n_prune: int, cap: int, round_to: int) -> torch.Tensor:
    """Global ranking of blocks: each layer's units sorted worst first and cut into blocks (the first
    holds ``units % round_to``, the rest ``round_to``), each scored by its mean, so a layer always
    loses a prefix of its worst units and keeps a multiple of ``round_to``. Blocks are taken in score
    order while that brings the total closer to ``n_prune``; dead units (-inf) come first."""
    layers, units = s.shape
    order = torch.argsort(s, dim=-1, stable=True)
    ends = [c for c in prune_counts(units, round_to)[1:] if c <= cap]
    blocks = []  # (mean score, layer, start, end)
    for layer in range(layers):
        ranked = s[layer, order[layer]]
        start = 0
        for end in ends:
            blocks.append((ranked[start:end].mean().item(), layer, start, end))
            start = end
    blocks.sort(key=lambda b: b[0])  # stable: a layer's blocks stay in order on ties
    keep = torch.ones(layers, units, dtype=torch.bool)
    total = 0
    for score, layer, start, end in blocks:
        size = end - start
        if score != -math.inf and abs(total + size - n_prune) >= abs(total - n_prune):
            break
        keep[layer, order[layer, start:end]] = False
        total += size
    return keep


def select_uniform(
    scores: torch.Tensor, alive: torch.Tensor, fraction: float, groups: int = 1, round_to: int = 1
) -> torch.Tensor:
    """Keep-mask with the same number removed in every layer (and every one of ``groups`` groups)."""
    layers, units = scores.shape
    per_group = units // groups
    k = min(round(fraction * per_group), per_group - 1)
    if round_to > 1:
        k = _nearest_count(k, per_group, round_to, per_group - 1)
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
    rules: WidthRules | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (head keep-mask, channel keep-mask) at unit granularity."""
    rules = rules or WidthRules()
    r = rules.round_to
    channel_fraction = fraction
    heads = None
    if rules.kv_heads_multiple_of and query_groups == 1:  # kv_group units (query units keep every KV head)
        units, channels = head_scores.shape[1], channel_scores.shape[1]
        ramp = fraction / rules.target if rules.target > 0 else 0.0
        final_kept = kept_kv_heads(units, rules.target, rules.kv_heads_multiple_of)
        m = rules.kv_heads_multiple_of
        kept = min(units, max(final_kept, m * round((units - ramp * (units - final_kept)) / m)))
        heads = _prune_lowest_per_row(head_scores, head_alive, units - kept)
        channel_fraction = max(0.0, ramp * channel_fraction_at_target(units, channels, rules))
    if scope == "global":
        if heads is None:
            heads = select_global(head_scores, head_alive, fraction, max_layer_sparsity)
        return heads, select_global(channel_scores, channel_alive, channel_fraction, max_layer_sparsity, r)
    if heads is None:
        heads = select_uniform(head_scores, head_alive, fraction, groups=query_groups)
    return heads, select_uniform(channel_scores, channel_alive, channel_fraction, round_to=r)


def width_rule_problems(
    num_kv_heads: int,
    intermediate_size: int,
    rules: WidthRules,
    scope: str,
    head_unit: str,
    max_layer_sparsity: float,
) -> list[str]:
    """Why the serving constraints cannot be met at the target on this model (empty: they can)."""
    problems = []
    r, m = rules.round_to, rules.kv_heads_multiple_of
    if r > intermediate_size:
        problems.append(f"pruning.round_to={r} exceeds the model's intermediate_size={intermediate_size}")
    if m > num_kv_heads:
        problems.append(f"pruning.kv_heads_multiple_of={m} exceeds the model's num_key_value_heads={num_kv_heads}")
    elif m and head_unit == "query" and num_kv_heads % m:
        problems.append(
            f"pruning.kv_heads_multiple_of={m} with pruning.head_unit=query: every layer keeps all "
            f"{num_kv_heads} KV heads, not a multiple of {m}"
        )
    elif m and head_unit == "kv_group" and rules.target > 0:
        c = channel_fraction_at_target(num_kv_heads, intermediate_size, rules)
        cap = _layer_cap(intermediate_size, max_layer_sparsity) if scope == "global" else intermediate_size - 1
        if c * intermediate_size > cap + max(r, 1):
            kept = kept_kv_heads(num_kv_heads, rules.target, m)
            problems.append(
                f"pruning.kv_heads_multiple_of={m}: every layer keeps {kept} of {num_kv_heads} KV heads, so reaching "
                f"pruning.target_sparsity={rules.target} needs {c:.0%} of the MLP channels cut, more than a layer "
                f"may lose ({cap} of {intermediate_size}); lower the target, choose a smaller multiple, or raise "
                "pruning.max_layer_sparsity"
            )
    return problems
