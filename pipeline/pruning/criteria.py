"""Importance criteria as objects, registered under their ``pruning.criterion`` names.

A criterion says what it needs from the run (adapters on the scored projections, gradients on the
masks, hooks armed before a scored step) and turns one scoring event into per-unit head and channel
scores; the pruner only calls the interface. Module criteria (``lora``, ``full_grad``, ``magnitude``)
score each projection from its weight, adapters and gradients in the shared ZeRO-3 loop of
``importance.module_scores``; ``taylor`` reads the mask gradients; ``random`` is a fixed draw.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from pipeline.config.schema import PruningConfig
from pipeline.dist import comm as D
from pipeline.model.structure import Structure
from pipeline.pruning.aggregation import all_reduce_scores, combine, mask_grad_scores, mix_mask_grad
from pipeline.pruning.importance import (
    FullGradients,
    ModuleRef,
    ScoreLayout,
    lora_module_scores,
    magnitude_module_scores,
    module_scores,
    taylor_module_scores,
)
from pipeline.pruning.masks import Masks

Lora = tuple[nn.Parameter, nn.Parameter, float]  # (A, B, scaling) of a module's adapter


@dataclass
class ScoringContext:
    """What a criterion may read: the scored projections, the score layout, the masks and the settings."""

    structure: Structure
    refs: list[ModuleRef]
    layout: ScoreLayout
    masks: Masks
    p: PruningConfig
    seed: int


class Criterion(ABC):
    name: ClassVar[str]
    needs_lora: ClassVar[bool] = False  # scores come from the adapters: both unit kinds need one
    masks_need_grad: bool = False  # backward must produce dL/dm on the masks

    def __init__(self, ctx: ScoringContext) -> None:
        self.ctx = ctx

    def begin_step(self, scoring: bool) -> None:  # noqa: B027 (an optional hook: most criteria need no setup)
        """Called on every rank before each step's first forward; ``scoring``: the step is scored."""

    @abstractmethod
    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(head scores [layers, head_units], channel scores [layers, intermediate]) for this event,
        identical on every rank; called on every rank between the boundary backward() and step()."""


class ModuleCriterion(Criterion):
    """Scores each projection in ``importance.module_scores`` (collectives on every rank, in order)."""

    skips_unadapted: ClassVar[bool] = False  # projections without LoRA contribute no score

    def gradients(self, index: int, ref: ModuleRef, lora: Lora | None) -> Any:
        """This module's gradients (a collective: called on every rank, before its weight is gathered)."""
        return None

    @abstractmethod
    def module_score(
        self, dense: torch.Tensor, ref: ModuleRef, lora: Lora | None, grads: Any, unit: int
    ) -> torch.Tensor:
        """Per-unit scores of one projection from its dense base weight (on its owner rank only)."""

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        flat = all_reduce_scores(module_scores(self.ctx.refs, self.ctx.layout, self))
        return combine(flat, self.ctx.layout, self.ctx.p.normalize)


def _merged(dense: torch.Tensor, lora: Lora | None) -> torch.Tensor:
    """The weight the forward uses, W' = W + s B A (dL/dW' = dL/dW)."""
    if lora is None:
        return dense
    a, b, s = lora
    return dense + s * (b.data.float() @ a.data.float())


class LoraCriterion(ModuleCriterion):
    """LoRAPrune: the weight gradient estimated from the adapters' (importance.py), optionally mixed with
    |dL/dm| (``pruning.mask_grad_mix``)."""

    name = "lora"
    needs_lora = True
    skips_unadapted = True

    def __init__(self, ctx: ScoringContext) -> None:
        super().__init__(ctx)
        self.mix = ctx.p.mask_grad_mix
        self.masks_need_grad = self.mix > 0  # the mask gradients come with the backward

    def gradients(self, index: int, ref: ModuleRef, lora: Lora | None) -> Any:
        a, b, _s = lora
        return D.full_grad(a), D.full_grad(b)  # collective under ZeRO-3

    def module_score(
        self, dense: torch.Tensor, ref: ModuleRef, lora: Lora | None, grads: Any, unit: int
    ) -> torch.Tensor:
        a, b, s = lora
        return lora_module_scores(dense, a.data, b.data, grads[0], grads[1], s, ref.name, unit, self.ctx.p.lora_reduce)

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        heads, chans = super().scores()
        if self.mix > 0:
            g_h, g_c = mask_grad_scores(self.ctx.masks)  # one all-reduce, like the LoRA scores
            heads, chans = mix_mask_grad(heads, g_h, self.mix), mix_mask_grad(chans, g_c, self.mix)
        return heads, chans


class FullGradCriterion(ModuleCriterion):
    """LLM-Pruner's element-wise Taylor with the exact weight gradient, accumulated by hooks on scored steps."""

    name = "full_grad"

    def __init__(self, ctx: ScoringContext) -> None:
        super().__init__(ctx)
        self.full = FullGradients(ctx.refs)

    def begin_step(self, scoring: bool) -> None:
        self.full.arm(scoring)

    def gradients(self, index: int, ref: ModuleRef, lora: Lora | None) -> Any:
        return self.full.averaged(index)  # collective: all-reduce of the weight gradient

    def module_score(
        self, dense: torch.Tensor, ref: ModuleRef, lora: Lora | None, grads: Any, unit: int
    ) -> torch.Tensor:
        return taylor_module_scores(_merged(dense, lora), grads, ref.name, unit)


class MagnitudeCriterion(ModuleCriterion):
    """Per-unit L2 norm of the merged weight (no gradients)."""

    name = "magnitude"

    def module_score(
        self, dense: torch.Tensor, ref: ModuleRef, lora: Lora | None, grads: Any, unit: int
    ) -> torch.Tensor:
        return magnitude_module_scores(_merged(dense, lora), ref.name, unit)


class TaylorCriterion(Criterion):
    """|dL/dm| of the unit masks, summed over the step (aggregation.mask_grad_scores)."""

    name = "taylor"
    masks_need_grad = True

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        return mask_grad_scores(self.ctx.masks)


class RandomCriterion(Criterion):
    """One fixed uniform draw from the run's seed, the same on every rank (a control)."""

    name = "random"

    def __init__(self, ctx: ScoringContext) -> None:
        super().__init__(ctx)
        s, g = ctx.structure, torch.Generator().manual_seed(ctx.seed)
        self.draw = (
            torch.rand(s.num_layers, s.head_units, generator=g, dtype=torch.float64),
            torch.rand(s.num_layers, s.intermediate_size, generator=g, dtype=torch.float64),
        )

    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.draw


CRITERIA: dict[str, type[Criterion]] = {
    c.name: c for c in (LoraCriterion, FullGradCriterion, TaylorCriterion, MagnitudeCriterion, RandomCriterion)
}


def make_criterion(ctx: ScoringContext) -> Criterion:
    return CRITERIA[ctx.p.criterion](ctx)
