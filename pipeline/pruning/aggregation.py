"""From per-module scores to one smoothed score per unit, identical on every rank.

One all-reduce per scoring event sums the per-rank partial score vectors (each unit was scored
by exactly one rank, the others add zeros). Module vectors are summed over the projections a unit
owns (with ``normalize=l2``, each is first L2-normalised per layer as in LoRAPrune, which makes
layers look alike to a global ranking); the moving average runs on the combined scores.
"""

from __future__ import annotations

import torch

from pipeline.dist import comm as D
from pipeline.model.structure import Structure
from pipeline.pruning.importance import ScoreLayout
from pipeline.pruning.masks import Masks


def all_reduce_scores(flat: torch.Tensor) -> torch.Tensor:
    return D.all_reduce_sum(flat)


def _to_head_units(v: torch.Tensor, s: Structure) -> torch.Tensor:
    """A per-query-head vector -> per head unit (sum over a KV group's query heads)."""
    if s.head_unit == "kv_group":
        return v.view(s.num_kv_heads, s.heads_per_group).sum(-1)
    return v


def combine(flat: torch.Tensor, layout: ScoreLayout, normalize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat module scores -> (heads [layers, head_units], channels [layers, intermediate])."""
    s = layout.s

    def norm(v: torch.Tensor) -> torch.Tensor:
        if normalize == "l2":
            n = v.norm()
            return v / n if n > 0 else v
        return v

    heads = torch.zeros(s.num_layers, s.head_units, dtype=torch.float64)
    chans = torch.zeros(s.num_layers, s.intermediate_size, dtype=torch.float64)
    flat = flat.detach().to("cpu", torch.float64)
    for layer in range(s.num_layers):
        for name in ("q_proj", "o_proj"):
            heads[layer] += norm(_to_head_units(layout.slice(flat, layer, name), s))
        if s.head_unit == "kv_group":  # k/v rows go only with the whole group
            for name in ("k_proj", "v_proj"):
                heads[layer] += norm(layout.slice(flat, layer, name))
        for name in ("gate_proj", "up_proj", "down_proj"):
            chans[layer] += norm(layout.slice(flat, layer, name))
    return heads, chans


def mask_grad_scores(masks: Masks) -> tuple[torch.Tensor, torch.Tensor]:
    """``taylor``: |dL/dm| of the global batch. Mask grads are per-rank (local micro-batches, already
    divided by grad_accum), so they are summed over ranks and divided by the world size before abs."""
    s = masks.s
    zeros_h, zeros_c = torch.zeros_like(masks.heads), torch.zeros_like(masks.channels)
    g_h = masks.heads.grad if masks.heads.grad is not None else zeros_h
    g_c = masks.channels.grad if masks.channels.grad is not None else zeros_c
    flat = torch.cat([g_h.flatten(), g_c.flatten()]).to(D.comm_device(), torch.float64)
    D.all_reduce_sum(flat)
    flat /= D.world_size()
    g_h = flat[: g_h.numel()].view_as(masks.heads).cpu()
    g_c = flat[g_h.numel() :].view_as(masks.channels).cpu()
    if s.head_unit == "kv_group":
        g_h = g_h.view(s.num_layers, s.num_kv_heads, s.heads_per_group).sum(-1)
    return g_h.abs(), g_c.abs()


def mix_mask_grad(lora: torch.Tensor, mask_grad: torch.Tensor, weight: float) -> torch.Tensor:
    """``lora / mean(lora) + weight * |dL/dm| / mean(|dL/dm|)`` over all units of one kind.

    Each signal is divided by its mean so that neither dominates by scale. The LoRA proxy sums
    element saliencies, which over-rates some layers on a real model (its per-layer totals were off
    from the exact-gradient ones by up to x3 on SmolLM2); the mask gradient is the exact first-order
    loss change of removing a unit and costs nothing extra.
    """

    def unit_mean(v: torch.Tensor) -> torch.Tensor:
        m = v.mean()
        return v / m if m > 0 else v

    return unit_mean(lora) + weight * unit_mean(mask_grad)


class ScoreTracker:
    """Moving average ``S = ema * S + (1 - ema) * S_new``; the first event initialises S.

    An event with a non-finite score is skipped entirely (and counted), so one bad batch cannot
    poison the average.
    """

    def __init__(self, ema: float) -> None:
        self.ema = ema
        self.heads: torch.Tensor | None = None
        self.channels: torch.Tensor | None = None
        self.events = 0
        self.skipped = 0

    def update(self, heads: torch.Tensor, channels: torch.Tensor) -> bool:
        if not (torch.isfinite(heads).all() and torch.isfinite(channels).all()):
            self.skipped += 1
            return False
        if self.heads is None:
            self.heads, self.channels = heads.clone(), channels.clone()
        else:
            self.heads.mul_(self.ema).add_(heads, alpha=1 - self.ema)
            self.channels.mul_(self.ema).add_(channels, alpha=1 - self.ema)
        self.events += 1
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {"events": torch.tensor(self.events), "skipped": torch.tensor(self.skipped)}
        if self.heads is not None:
            out["heads"], out["channels"] = self.heads.clone(), self.channels.clone()
        return out

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.events, self.skipped = int(sd["events"]), int(sd["skipped"])
        self.heads = sd["heads"].to(torch.float64).clone() if "heads" in sd else None
        self.channels = sd["channels"].to(torch.float64).clone() if "channels" in sd else None
