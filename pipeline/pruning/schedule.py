"""When to prune: a cubic sparsity ramp that reaches the target exactly at its last decision."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CubicSchedule:
    """Sparsity after optimizer step ``t`` (1-based), for ``steps`` steps in all.

    ``0`` up to ``start = round(warmup * steps)``, then
    ``target * (1 - (1 - (t - start) / (end - start)) ** 3)``, and ``target`` from
    ``end = steps - round(cooldown * steps)`` on. Decisions fall every ``every`` steps after
    ``start`` and always at ``end`` itself, so the final decision asks for the full target
    (not a value just below it).
    """

    target: float
    steps: int
    warmup: float = 0.1
    cooldown: float = 0.2
    every: int = 10

    @property
    def start(self) -> int:
        return min(round(self.warmup * self.steps), self.steps - 1)

    @property
    def end(self) -> int:
        return max(self.steps - round(self.cooldown * self.steps), self.start + 1)

    def sparsity(self, t: int) -> float:
        if t <= self.start:
            return 0.0
        if t >= self.end:
            return self.target
        p = (t - self.start) / (self.end - self.start)
        return self.target * (1.0 - (1.0 - p) ** 3)

    def is_decision(self, t: int) -> bool:
        if self.target <= 0 or t <= self.start or t > self.end:
            return False
        return t == self.end or (t - self.start) % self.every == 0

    def decision_steps(self) -> list[int]:
        return [t for t in range(1, self.steps + 1) if self.is_decision(t)]
