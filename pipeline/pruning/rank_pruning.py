"""Adapter rank pruning (the PrunedLoRA idea): start over-parameterised, remove rank-1 components.

Write each adapter as ``s * sum_k c_k b_k a_k^T`` with coefficients ``c_k = 1``. Removing component
k sets ``c_k = 0``. The loss gradient in coefficient space is ``dL/dc_k = b_k . dL/db_k`` (=
``a_k . dL/da_k``): r numbers per module, from the LoRA gradients alone. Their moving second moment
``F = E[g g^T]`` (empirical Fisher, r x r per module) stands in for the Hessian. Optimal Brain Surgeon
in this space gives, for removing a set E with the other coefficients free to compensate,

    loss increase  = 1/2 c_E^T (F^-1_EE)^-1 c_E,       recovery  delta = -F^-1[:, E] (F^-1_EE)^-1 c_E

(dimensionally consistent: c is dimensionless, F has the loss's units). Single-component costs
``1 / (2 F^-1_kk)`` rank the components of all modules against each other (one global budget, so
rank goes where it helps); the recovery rescales the kept columns of B by ``1 + delta_j``.

Removed components never come back: their A rows, B columns and Adam moments are zeroed after the
optimizer step. With ``a_k = 0`` and ``b_k = 0`` both gradients of the component are exactly zero
(``dL/dB[:, k] ~ a_k . x``, ``dL/dA[k] ~ b_k . g``), so Adam moments, weight decay and clipping keep
them at zero from then on. Under ZeRO-3 the fp32 master, both moments and the working copy are
written (the same decision on every rank, checked by a mask hash).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from torch import nn

from pipeline.dist import comm as D
from pipeline.pruning.schedule import CubicSchedule

ADAPTER = "default"
_PEFT_PREFIX = "base_model.model."


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(module path in the base model, PEFT LoRA layer) for every adapted projection."""
    for name, m in model.named_modules():
        lora_a = getattr(m, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and ADAPTER in lora_a:
            yield name.removeprefix(_PEFT_PREFIX), m


class RankPruner:
    def __init__(
        self,
        model: nn.Module,
        init_r: int,
        target_r: float,
        steps: int,
        warmup: float,
        cooldown: float,
        every: int,
        ema: float = 0.9,
        damping: float = 1e-2,
    ) -> None:
        self.layers = list(lora_layers(model))
        self.init_r, self.ema, self.damping = init_r, ema, damping
        self.sizes = {
            n: _shape(m.lora_A[ADAPTER].weight)[1] + _shape(m.lora_B[ADAPTER].weight)[0] for n, m in self.layers
        }
        self.full_params = init_r * sum(self.sizes.values())
        self.schedule = CubicSchedule(1.0 - target_r / init_r, steps, warmup, cooldown, every)
        self.alive = {n: torch.ones(init_r, dtype=torch.bool) for n, _ in self.layers}
        self.fisher = {n: torch.zeros(init_r, init_r, dtype=torch.float64) for n, _ in self.layers}
        self.events = 0

    # -- when
    def observe_due(self, t: int) -> bool:
        return t <= self.schedule.end and self.schedule.target > 0

    def is_decision(self, t: int) -> bool:
        return self.schedule.is_decision(t)

    # -- scoring
    def observe(self) -> None:
        """Accumulate the coefficient-gradient second moment; every rank, before ``step()``."""
        for name, m in self.layers:
            b = m.lora_B[ADAPTER].weight
            gb = D.full_grad(b)  # averaged over ranks and micro-batches: the same on every rank
            with D.gathered([b]):
                g = (b.data.double() * gb.double()).sum(0).cpu()
            f = self.fisher[name]
            if self.events == 0:
                f.copy_(torch.outer(g, g))
            else:
                f.mul_(self.ema).add_(torch.outer(g, g), alpha=1 - self.ema)
        self.events += 1

    def _inverse(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        f = self.fisher[name][idx][:, idx]
        damp = self.damping * f.diagonal().mean().clamp_min(1e-30)
        return torch.linalg.inv(f + damp * torch.eye(len(idx), dtype=f.dtype))

    def costs(self) -> dict[str, torch.Tensor]:
        """OBS cost of removing each alive component alone (inf for removed ones)."""
        out = {}
        for name, _ in self.layers:
            idx = self.alive[name].nonzero().flatten()
            c = torch.full((self.init_r,), math.inf, dtype=torch.float64)
            c[idx] = 0.5 / self._inverse(name, idx).diagonal()
            out[name] = c
        return out

    # -- decisions
    def ranks(self) -> dict[str, int]:
        return {n: int(a.sum()) for n, a in self.alive.items()}

    def decide(self, t: int, engine: Any) -> dict[str, list[int]]:
        """Remove components down to the scheduled parameter budget; after ``engine.step()``, every rank.

        The budget is in adapter parameters (a component of a module costs d_in + d_out), so the
        final adapter has as many parameters as plain LoRA at rank ``target_r``; components go in
        order of OBS cost per parameter saved.
        """
        keep = round(self.full_params * (1.0 - self.schedule.sparsity(t)))
        excess = self.adapter_params() - keep
        if excess <= 0:
            return {}
        costs = self.costs()
        # Every module keeps at least its most important component: PEFT needs r >= 1.
        for c in costs.values():
            c[torch.argmax(c.masked_fill(~torch.isfinite(c), -math.inf))] = math.inf
        names = [n for n, _ in self.layers]
        sizes = torch.tensor([self.sizes[n] for n in names], dtype=torch.float64).repeat_interleave(self.init_r)
        flat = torch.stack([costs[n] for n in names]).flatten() / sizes
        order = torch.argsort(flat, stable=True)
        order = order[torch.isfinite(flat[order])]
        n_remove = int(torch.searchsorted(sizes[order].cumsum(0), torch.tensor(float(excess)))) + 1
        order = order[:n_remove]
        removed: dict[str, list[int]] = {}
        for i in order.tolist():
            removed.setdefault(names[i // self.init_r], []).append(i % self.init_r)
        for name, m in self.layers:
            if name in removed:
                self._remove(name, m, torch.tensor(sorted(removed[name])), engine)
        D.verify_identical(list(self.alive.values()), "adapter rank masks")
        return removed

    def _remove(self, name: str, m: nn.Module, gone: torch.Tensor, engine: Any) -> None:
        alive_idx = self.alive[name].nonzero().flatten()
        pos = torch.searchsorted(alive_idx, gone)
        finv = self._inverse(name, alive_idx)
        delta = -finv[:, pos] @ torch.linalg.solve(finv[pos][:, pos], torch.ones(len(pos), dtype=finv.dtype))
        scale = torch.zeros(self.init_r, dtype=torch.float64)
        # A trust region: the quadratic model is only local, so no kept component more than doubles or vanishes.
        scale[alive_idx] = 1.0 + delta.clamp(-1.0, 1.0)
        scale[gone] = 0.0
        self.alive[name][gone] = False
        a, b = m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight
        _rewrite(b, engine, lambda w: w * scale.to(w)[None, :], lambda s: s * self.alive[name].to(s)[None, :])
        _rewrite(
            a, engine, lambda w: w * self.alive[name].to(w)[:, None], lambda s: s * self.alive[name].to(s)[:, None]
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f"alive.{n}": a.clone() for n, a in self.alive.items()}
        sd.update({f"fisher.{n}": f.clone() for n, f in self.fisher.items()})
        sd["events"] = torch.tensor(self.events)
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for n in self.alive:
            self.alive[n] = sd[f"alive.{n}"].to(torch.bool).clone()
            self.fisher[n] = sd[f"fisher.{n}"].to(torch.float64).clone()
        self.events = int(sd["events"])

    def adapter_params(self) -> int:
        """Parameters of the kept components: r_m * (d_in + d_out) summed over modules."""
        return sum(int(self.alive[n].sum()) * self.sizes[n] for n, _ in self.layers)


def _shape(p: nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 leaves p.shape == (0,)


def _rewrite(p: nn.Parameter, engine: Any, weight_fn: Any, state_fn: Any) -> None:
    """Apply ``weight_fn`` to the fp32 master and working copy of ``p`` and ``state_fn`` to its Adam
    moments (collectives under ZeRO-3: called on every rank in the same order)."""
    full = safe_get_full_fp32_param(p)
    if full is None:  # plain optimizer, no DeepSpeed partitioning
        with torch.no_grad():
            p.copy_(weight_fn(p.detach()))
        state = engine.optimizer.state.get(p, {}) if hasattr(engine, "optimizer") else {}
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].copy_(state_fn(state[key]))
        return
    new = weight_fn(full)
    safe_set_full_fp32_param(p, new)
    for key in ("exp_avg", "exp_avg_sq"):
        s = safe_get_full_optimizer_state(p, key)
        if s is not None:
            safe_set_full_optimizer_state(p, state_fn(s), key)
    with D.gathered_for_update([p]):
        if D.is_main():
            with torch.no_grad():
                p.data.copy_(new.to(p.dtype).view_as(p.data))
