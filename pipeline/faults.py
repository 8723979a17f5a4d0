"""Fault injection for the recovery tests: real signals and a real non-finite loss at a chosen step.

``PIPELINE_FAULTS`` is a comma-separated list of ``KIND@STEP[:RANK]`` (all ranks when RANK is
left out), read once at start:
  sigkill@6:1   rank 1 kills itself with SIGKILL at the end of step 6 (a node dying)
  sigterm@5:0   rank 0 receives SIGTERM at the end of step 5 (Slurm's time limit reaching one rank first)
  nan@3         the loss of step 3 is NaN on every rank (an overflow, a bad batch)
Unset in normal runs; nothing here runs then.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch

ENV = "PIPELINE_FAULTS"
KINDS = ("sigkill", "sigterm", "nan")


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None


def parse(spec: str) -> list[Fault]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            kind, rest = item.split("@", 1)
            step, _, rank = rest.partition(":")
            fault = Fault(kind, int(step), int(rank) if rank else None)
        except ValueError as e:
            raise ValueError(f"{ENV}: {item!r} is not KIND@STEP[:RANK]") from e
        if fault.kind not in KINDS:
            raise ValueError(f"{ENV}: {item!r}: kind must be one of {', '.join(KINDS)}")
        out.append(fault)
    return out


class Faults:
    def __init__(self, rank: int, spec: str | None = None) -> None:
        spec = os.environ.get(ENV, "") if spec is None else spec
        self.faults = [f for f in parse(spec) if f.rank in (None, rank)]

    def _due(self, kind: str, step: int) -> bool:
        return any(f.kind == kind and f.step == step for f in self.faults)

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if self._due("nan", step) else loss

    def end_of_step(self, step: int) -> None:
        if self._due("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)
        if self._due("sigkill", step):
            os.kill(os.getpid(), signal.SIGKILL)
