"""Fault injection for the recovery tests: real signals and a real non-finite loss at a chosen step.

``PIPELINE_FAULTS`` is a comma-separated list of ``KIND@STEP[:RANK]`` (all ranks when RANK is
left out), read once at start:
  sigkill@6:1   rank 1 kills itself with SIGKILL at the end of step 6 (a node dying)
  sigterm@5:0   rank 0 receives SIGTERM at the end of step 5 (Slurm's time limit reaching one rank first)
  sigint@4      every rank receives SIGINT at the end of step 4 (Ctrl-C in the terminal)
  sigterm@0     step 0 is start-up: the signal comes before the data is read (preempted while loading)
  nan@3         the loss of step 3 is NaN on every rank (an overflow, a bad batch)
  noshrink@6:1  rank 1 does not shrink the model at step 6 although it is due (a rank that disagrees)
Unset in normal runs; nothing here runs then.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import torch

from pipeline.errors import ConfigError

ENV = "PIPELINE_FAULTS"
KINDS = ("sigkill", "sigterm", "sigint", "nan", "noshrink")
_SIGNALS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sigkill": signal.SIGKILL}


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None


def parse(spec: str) -> list[Fault]:
    """Every malformed item is reported at once (exit 2), before any work."""
    out, errs = [], []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            kind, rest = item.split("@", 1)
            step, _, rank = rest.partition(":")
            fault = Fault(kind, int(step), int(rank) if rank else None)
        except ValueError:
            errs.append(f"{item!r} is not KIND@STEP[:RANK] (e.g. sigterm@5:0)")
            continue
        if fault.kind not in KINDS:
            errs.append(f"{item!r}: kind must be one of {', '.join(KINDS)}")
        elif fault.step < 0 or (fault.rank is not None and fault.rank < 0):
            errs.append(f"{item!r}: step and rank must be >= 0")
        else:
            out.append(fault)
    if errs:
        raise ConfigError(f"{ENV}={spec}: " + "; ".join(errs) + f"; fix or unset {ENV}")
    return out


class Faults:
    def __init__(self, rank: int, spec: str | None = None) -> None:
        spec = os.environ.get(ENV, "") if spec is None else spec
        self.faults = [f for f in parse(spec) if f.rank in (None, rank)]

    def _due(self, kind: str, step: int) -> bool:
        return any(f.kind == kind and f.step == step for f in self.faults)

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if self._due("nan", step) else loss

    def shrink(self, step: int, due: bool) -> bool:
        """Whether this rank shrinks at ``step``: ``due``, unless told to disagree."""
        return due and not self._due("noshrink", step)

    def end_of_step(self, step: int) -> None:
        """At the end of ``step``; step 0 is start-up, before the data is read."""
        for kind, sig in _SIGNALS.items():
            if self._due(kind, step):
                os.kill(os.getpid(), sig)
