import itertools

import pytest

from pipeline.pruning.schedule import CubicSchedule


@pytest.mark.parametrize("steps,every", [(100, 10), (60, 5), (37, 4), (6, 2), (10, 1)])
def test_reaches_target_exactly_and_is_monotone(steps: int, every: int):
    s = CubicSchedule(0.5, steps, warmup=0.1, cooldown=0.2, every=every)
    values = [s.sparsity(t) for t in range(steps + 1)]
    assert all(b >= a for a, b in itertools.pairwise(values))
    decisions = s.decision_steps()
    assert decisions, "at least one decision"
    assert s.sparsity(decisions[-1]) == 0.5  # the last decision asks for the full target
    assert decisions[-1] <= steps
    assert all(s.sparsity(t) == 0 for t in range(s.start + 1))


def test_cubic_shape():
    s = CubicSchedule(0.8, 100, warmup=0.0, cooldown=0.0, every=10)
    assert s.sparsity(50) == pytest.approx(0.8 * (1 - 0.5**3))
    assert s.decision_steps() == list(range(10, 101, 10))


def test_zero_target_never_decides():
    assert CubicSchedule(0.0, 50).decision_steps() == []
