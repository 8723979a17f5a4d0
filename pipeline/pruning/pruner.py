"""Pruning orchestration: when to score, scoring events, and mask decisions."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from pipeline.config.schema import PruningConfig, lora_coverage_problems
from pipeline.dist import comm as D
from pipeline.errors import ConfigError
from pipeline.model.structure import Structure, StructureError
from pipeline.pruning.aggregation import ScoreTracker
from pipeline.pruning.criteria import ScoringContext, make_criterion
from pipeline.pruning.importance import ScoreLayout, module_refs
from pipeline.pruning.masks import Masks
from pipeline.pruning.schedule import CubicSchedule
from pipeline.pruning.selection import WidthRules, auto_round_to, decide, width_rule_problems


def width_rules(s: Structure, p: PruningConfig) -> WidthRules:
    head, channel = s.params_per_head_unit, s.params_per_channel
    round_to = p.round_to or auto_round_to(s.intermediate_size)
    return WidthRules(round_to, p.kv_heads_multiple_of, p.target_sparsity, head, channel)


def check_width_rules(s: Structure, p: PruningConfig) -> None:
    """Refuses serving constraints the model cannot meet at the target (before training starts)."""
    problems = width_rule_problems(
        s.num_kv_heads, s.intermediate_size, width_rules(s, p), p.scope, s.head_unit, p.max_layer_sparsity
    )
    if problems:
        raise StructureError("; ".join(problems))


def check_lora_coverage(criterion: str, adapted: set[str]) -> None:
    """The config-time rule (pipeline.config.schema) re-checked on the loaded model, whose module names
    may differ from lora.target_modules: ``adapted`` = projection names that carry LoRA."""
    problems = lora_coverage_problems(criterion, adapted)
    if problems:
        raise ConfigError("; ".join(problems))


def decide_units(
    s: Structure,
    heads: torch.Tensor,
    channels: torch.Tensor,
    masks: Masks,
    fraction: float,
    scope: str,
    max_layer_sparsity: float,
    rules: WidthRules | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores -> (head, channel) keep-masks at unit granularity among the units ``masks`` still keeps: the one
    decision rule of training, the reachability check and the benchmark's one-shot masks."""
    groups = s.num_kv_heads if s.head_unit == "query" else 1  # query units are pruned within each KV group
    # The decision is made on the CPU, where the smoothed scores live (the masks may be on a GPU).
    alive_h, alive_c = masks.head_units().cpu(), masks.channel_units().cpu()
    return decide(heads.cpu(), channels.cpu(), alive_h, alive_c, fraction, scope, max_layer_sparsity, groups, rules)


class Pruner:
    def __init__(self, model: nn.Module, s: Structure, masks: Masks, p: PruningConfig, steps: int, seed: int) -> None:
        self.s, self.masks, self.p = s, masks, p
        self.refs = module_refs(model)
        self.layout = ScoreLayout(s)
        self.schedule = CubicSchedule(p.target_sparsity, steps, p.warmup, p.cooldown, p.prune_every)
        self.tracker = ScoreTracker(p.ema)
        self.decisions: list[int] = []
        check_lora_coverage(p.criterion, {r.name for r in self.refs if r.has_lora})
        self.criterion = make_criterion(ScoringContext(s, self.refs, self.layout, masks, p, seed))
        masks.requires_grad_(self.criterion.masks_need_grad)
        self.score_seconds = 0.0  # wall time in score(), and the bytes it all-reduced (perf summary)
        self.score_allreduce_bytes = 0

    def refresh(self, model: nn.Module) -> None:
        """Point the scored projections at ``model``'s modules again (after a shrink replaced some)."""
        self.refs[:] = module_refs(model)  # the criterion's context holds the same list

    @property
    def active(self) -> bool:
        return self.p.target_sparsity > 0

    def score_due(self, t: int) -> bool:
        """Score on the step grid and right before each decision; nothing after the last one."""
        if not self.active or t > self.schedule.end:
            return False
        return t % self.p.score_every == 0 or self.schedule.is_decision(t)

    def begin_step(self, t: int) -> None:
        """Call on every rank before step ``t``'s first forward."""
        self.criterion.begin_step(self.score_due(t))

    def score(self) -> None:
        """Call on every rank between the boundary backward() and step()."""
        t0, sent = time.perf_counter(), D.traffic["all_reduce"]
        heads, chans = self.criterion.scores()
        self.tracker.update(heads, chans)
        self.score_seconds += time.perf_counter() - t0
        self.score_allreduce_bytes += D.traffic["all_reduce"] - sent

    def decide(self, t: int) -> float:
        """Apply the scheduled sparsity for step ``t``; returns the scheduled value."""
        target = self.schedule.sparsity(t)
        if self.tracker.heads is None:
            raise RuntimeError("no valid scores before the first mask decision (all scoring events were non-finite)")
        keep_h, keep_c = decide_units(
            self.s,
            self.tracker.heads,
            self.tracker.channels,
            self.masks,
            target,
            self.p.scope,
            self.p.max_layer_sparsity,
            width_rules(self.s, self.p),
        )
        self.masks.set_units(keep_h, keep_c)
        D.verify_identical([self.masks.heads, self.masks.channels], "masks")
        self.decisions.append(t)
        return target

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Everything a resumed run needs to take the same decisions: masks, smoothed scores, history."""
        sd = {f"masks.{k}": v for k, v in self.masks.state_dict().items()}
        sd.update({f"scores.{k}": v for k, v in self.tracker.state_dict().items()})
        sd["decisions"] = torch.tensor(self.decisions, dtype=torch.int64)
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.masks.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("masks.")})
        self.tracker.load_state_dict({k[7:]: v for k, v in sd.items() if k.startswith("scores.")})
        self.decisions = [int(t) for t in sd["decisions"]]


def reachable_sparsity(s: Structure, p: PruningConfig) -> float:
    """The largest fraction of prunable parameters the caps allow on this model (max_layer_sparsity, one
    unit of each kind kept per layer or KV group): the decision rule itself, at fraction 1."""
    m = Masks(s)
    zeros_h, zeros_c = torch.zeros(s.num_layers, s.head_units), torch.zeros(s.num_layers, s.intermediate_size)
    keep_h, keep_c = decide_units(s, zeros_h, zeros_c, m, 1.0, p.scope, p.max_layer_sparsity)
    m.set_units(keep_h, keep_c)
    return m.sparsity()


def check_reachable(s: Structure, p: PruningConfig) -> None:
    """Refuse a target the caps cannot reach (it would be reached silently short)."""
    reach = reachable_sparsity(s, p)
    # Decisions round to whole units: a target within one unit of each kind of the cap is met as nearly as it can be.
    unit = (s.params_per_head_unit + s.params_per_channel) / s.prunable_params
    if p.target_sparsity > reach + unit:
        most = math.floor(reach * 1000) / 1000
        cap = f"pruning.max_layer_sparsity={p.max_layer_sparsity} and " if p.scope == "global" else ""
        raise ConfigError(
            f"pruning.target_sparsity={p.target_sparsity} cannot be reached on this model: with {cap}at least "
            f"one head unit ({s.head_unit}) and one MLP channel kept per layer (scope {p.scope}), at most "
            f"{reach:.4f} of the prunable parameters can be removed ({s.head_units} head units and "
            f"{s.intermediate_size} channels per layer); lower pruning.target_sparsity to {most} or less"
        )
