"""The criterion registry against the config schema and the benchmark's methods (no process starts)."""

import dataclasses
import typing

from benchmarks.bench import METHODS
from pipeline.config import schema
from pipeline.pruning.criteria import CRITERIA, Criterion, ModuleCriterion


def test_registry_names_are_the_schemas_allowed_criteria():
    # A criterion registered but not allowed by the config's Literal, or allowed but not registered, fails here.
    hints = typing.get_type_hints(schema.PruningConfig)
    field = next(f for f in dataclasses.fields(schema.PruningConfig) if f.name == "criterion")
    assert sorted(CRITERIA) == sorted(typing.get_args(hints[field.name]))


def test_config_time_lora_rule_agrees_with_the_registry():
    # The schema checks LoRA coverage before any import of torch; the registry says which criteria need it.
    for name, crit in CRITERIA.items():
        assert bool(schema.lora_coverage_problems(name, set())) == crit.needs_lora, name


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
