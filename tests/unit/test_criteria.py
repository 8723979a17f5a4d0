"""The criterion registry against the config schema and the benchmark's methods (no process starts)."""

from benchmarks.bench import METHODS
from pipeline.config import schema
from pipeline.pruning.criteria import CRITERIA, Criterion, ModuleCriterion


def test_registry_names_are_the_schemas_allowed_criteria():
    # The schema lists the allowed values in _CHOICES today (h15a may expose them as a Literal type; then read
    # them from there): a criterion registered but not allowed, or allowed but not registered, fails here.
    assert sorted(CRITERIA) == sorted(schema._CHOICES["pruning.criterion"])


def test_every_benchmark_method_runs_a_registered_criterion():
    assert {crit for crit, _quant in METHODS.values()} == set(CRITERIA)


def test_registered_criteria_say_what_they_need():
    assert all(issubclass(c, Criterion) and CRITERIA[c.name] is c for c in CRITERIA.values())
    assert [n for n, c in CRITERIA.items() if c.needs_lora] == ["lora"]
    assert sorted(n for n, c in CRITERIA.items() if issubclass(c, ModuleCriterion)) == [
        "full_grad",
        "lora",
        "magnitude",
    ]
    assert CRITERIA["taylor"].masks_need_grad and not CRITERIA["random"].masks_need_grad
