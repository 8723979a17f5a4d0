"""tools/plan.py and benchmarks/planner.py: presets, monotonicity, the verdict, and planned vs measured bytes."""

from __future__ import annotations

import gc
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, free_port, write_config

from benchmarks import planner as P
from pipeline.train.perf import LiveBytes  # peak bytes of storages created in a block (CPU has no allocator peak)


def _plan(model: str = "llama2-70b", **kw: Any) -> P.Plan:
    return P.plan(
        P.load_model_spec(model),
        P.Settings(zero=P.ZeroSettings.from_ds_config(ROOT / "ds_configs" / "zero3.json"), **kw),
    )


def _plan_cli(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script rewrites sys.path[0]
    mod = importlib.import_module("benchmarks.plan")  # the command tools/plan.py wraps
    return mod.main


def test_fit_verdict_and_cli_exit_codes(capsys, monkeypatch):
    assert _plan("llama2-70b", nodes=1).fits
    small = _plan("llama2-70b", nodes=8, gpu_mem_gb=24)
    assert not small.fits and small.peak_phase == "load"  # more nodes cannot help: the full 4-bit copy
    long_ctx = _plan("llama3-70b", nodes=4, seq_len=32768, micro_batch=2)
    assert not long_ctx.fits and long_ctx.peak_phase == "train"
    # The script as users run it, once; then its main() in-process.
    ok = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "plan.py"), "--model", "llama3-70b", "--nodes", "2"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0 and "fits" in ok.stdout and "world 16 = 2 node(s) x 8 GPU(s)" in ok.stdout
    main = _plan_cli(monkeypatch)
    capsys.readouterr()
    assert main(["--model", "llama2-70b", "--gpu-mem-gb", "24", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["fits"] is False
    assert main(["--model", "nope-70b"]) == 2 and "not a preset" in capsys.readouterr().err


def _live_storages() -> dict[int, int]:
    """Bytes of every storage a live Python tensor points at, by storage address: an oracle that does not
    know which objects the model or the engine hold, unlike the planner's inventory it checks."""
    gc.collect()
    out: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            storage = obj.untyped_storage()
            if storage.nbytes():
                out[storage.data_ptr()] = storage.nbytes()
    return out


def _grown(before: dict[int, int]) -> int:
    return sum(n for ptr, n in _live_storages().items() if ptr not in before)


def _measure(rank: int, world: int, port: int, config: str, results: Any) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
    )
    import deepspeed
    import torch.distributed as dist

    from pipeline.config.ds_config import resolve
    from pipeline.config.schema import load_config
    from pipeline.dist import comm as D
    from pipeline.model.loading import load_model
    from pipeline.model.structure import discover
    from pipeline.pruning.criteria import LoraCriterion, ScoringContext
    from pipeline.pruning.importance import ScoreLayout, module_refs, module_scores
    from pipeline.pruning.masks import Masks

    D.init(timeout_minutes=2)
    cfg = load_config(config)
    ds = resolve(cfg, world)
    before = _live_storages()
    model, _hf = load_model(cfg, ds)
    loaded = _grown(before)  # before deepspeed.initialize partitions anything
    structure = discover(model)
    Masks(structure).attach(model)  # as the trainer does: the masked copies are activations too
    params = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=torch.optim.AdamW(params, lr=1e-3), config=ds
    )
    engine.train()
    x = torch.randint(
        0, 512, (cfg.train.micro_batch_size, cfg.data.seq_len), generator=torch.Generator().manual_seed(rank)
    )
    engine.backward(engine(input_ids=x, labels=x).loss)  # first step: persistent params fetched, Adam state made
    engine.step()
    held = _grown(before)
    with LiveBytes() as train:
        engine.backward(engine(input_ids=x, labels=x).loss)
    refs, layout = module_refs(model), ScoreLayout(structure)
    lora = LoraCriterion(ScoringContext(structure, refs, layout, Masks(structure), cfg.pruning, 0))
    with LiveBytes() as score:
        module_scores(refs, layout, lora)
    with LiveBytes() as step:
        engine.step()
    results[rank] = {"resident": held, "load": loaded, "train": train.peak, "score": score.peak}
    results[rank] |= {"step": step.peak}
    dist.destroy_process_group()


def _planned(model_dir: Path, world: int, dtype: str, zero: P.ZeroSettings, ckpt: bool) -> P.Plan:
    st = P.Settings(
        nodes=world,
        gpus_per_node=1,
        seq_len=32,
        micro_batch=2,
        lora_r=4,
        dtype=dtype,
        zero=zero,
        gradient_checkpointing=ckpt,
    )
    return P.plan(P.load_model_spec(str(model_dir)), st)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory, tokenizer_dir) -> Path:
    """The tiny Llama with a 1024-wide MLP, so that a decoder layer, not the logits, sets the peak."""
    from conftest import _config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _config("llama")
    cfg.intermediate_size = 1024
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("model-wide")
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


# (model, world, dtype, checkpointing): 1 rank holds everything; 2 ranks with a persistence
# threshold of 300 elements mix partitioned and persistent tensors of every kind.
CASES = [("llama", 1, "fp32", True), ("wide", 1, "bf16", True), ("wide", 2, "fp32", False)]


# Measured on CPU against every live storage: resident -0.3 to -1.0 % (the masks and this test's inputs, which
# the planner leaves out: kilobytes here, megabytes on a 70B model), load -0.4 %, train within -6.1 %, score
# within -5.1 %, step -0.03 %.
TOLERANCE = {"resident": 0.015, "load": 0.01, "train": 0.10, "score": 0.10, "step": 0.02}


@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_planned_vs_measured(case, make_model, wide_model, tmp_path):
    import torch.multiprocessing as mp

    arch, world, dtype, ckpt = case
    model_dir = make_model("llama") if arch == "llama" else wide_model
    ds = json.loads((ROOT / "ds_configs" / "zero3_cpu.json").read_text())
    ds["zero_optimization"].update(stage3_param_persistence_threshold=300, reduce_bucket_size=100_000)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = write_config(
        tmp_path / "c.yaml",
        model_dir,
        tmp_path / "out",
        model={"dtype": dtype},
        train={"gradient_checkpointing": ckpt},
        deepspeed={"config": str(tmp_path / "ds.json")},
    )
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_measure, args=(world, free_port(), str(cfg), results), nprocs=world, join=True)
        measured = dict(results)[0]
    plan = _planned(model_dir, world, dtype, P.ZeroSettings.from_ds_config(tmp_path / "ds.json"), ckpt)
    resident = sum(v for g, _, v in plan.memory if g == "resident")
    quantizing = max(o * i for o, i in P.projections(plan.model.structure).values()) * P.DTYPE_BYTES[dtype]
    planned = {
        "resident": resident,
        "load": plan.phases["load"] - quantizing,  # measured after loading, not while quantizing
        **{k: plan.phases[k] - resident for k in ("train", "score", "step")},
    }
    got = dict(measured)
    errors = {k: planned[k] / got[k] - 1 for k in planned}
    report = ", ".join(f"{k} planned {planned[k]:,.0f} measured {got[k]:,.0f} ({errors[k]:+.1%})" for k in planned)
    print(f"{case}: {report}")
    for k, tol in TOLERANCE.items():
        assert abs(errors[k]) <= tol, report
