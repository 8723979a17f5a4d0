"""Distillation through the real CLI: ZeRO-3 over gloo with an NF4 base, 1 process vs 2 ranks, and
the in-engine teacher (adapters and masks off) vs the same model loaded as a separate teacher."""

import json
from pathlib import Path

import pytest
from conftest import read_summary, run_pipeline, write_config

pytestmark = pytest.mark.distributed


def _losses(out: Path) -> list[float]:
    return [json.loads(r)["loss"] for r in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def distill_runs(make_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distill")
    model = make_model("llama")
    runs = {}
    distill = {"enabled": True, "alpha": 0.7, "temperature": 2.0, "chunk_tokens": 16}
    for name, ranks, gas, teacher in (("one", 1, 2, "base"), ("two", 2, 1, "base"), ("path", 1, 2, str(model))):
        out = tmp / name
        cfg = write_config(
            tmp / f"{name}.yaml",
            model,
            out,
            train={"grad_accum": gas, "steps": 8},
            distill={**distill, "teacher": teacher},
        )
        proc = run_pipeline(cfg, ranks=ranks)
        assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        runs[name] = (out, read_summary(out))
    return runs


def test_two_rank_losses_equal_single_process(distill_runs):
    (one, s1), (two, s2) = distill_runs["one"], distill_runs["two"]
    assert s1["global_batch"] == s2["global_batch"] == 4 and s2["world_size"] == 2
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 8
    assert a == pytest.approx(b, rel=1e-4)
    assert s1["distill"]["train_kl_final"] == pytest.approx(s2["distill"]["train_kl_final"], rel=1e-3)
    # Before any update the student is the teacher (B = 0, no masks): the KL term is zero, so the
    # first loss is (1 - alpha) * CE; once units are masked the KL is not.
    assert s1["distill"]["train_kl_final"] > 1e-4
    assert s1["achieved_sparsity"] == pytest.approx(0.5, abs=0.03)
    assert 0 < s1["distill"]["teacher_time_share"] < 1
    assert 0 < s1["distill"]["objective_time_share"] < 1


def test_separate_teacher_equals_in_engine_teacher(distill_runs):
    """The base loaded again as distill.teacher (its own ZeRO-3 engine) gives the same teacher."""
    (one, _), (path, sp) = distill_runs["one"], distill_runs["path"]
    assert sp["distill"]["teacher"] != "base"
    assert _losses(path) == pytest.approx(_losses(one), rel=1e-5)
