"""Data users bring: formats, prompt masking, packing boundaries, the cache, mixing, rank 0 tokenizing
for all ranks, and the error messages."""

import os
from pathlib import Path

import datasets
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, TEXTS, alpaca_record, free_port, jsonl, read_summary, run_pipeline, write_config
from transformers import AutoTokenizer

from pipeline.config.schema import DataConfig
from pipeline.data.dataset import DataError, load_split


def _rank_worker(rank: int, port: int, tmp: str, tokenizer_dir: str, results) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from pipeline.dist import comm as D

    D.init(timeout_minutes=1)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if rank == 1:  # must read rank 0's cache, never tokenize
        datasets.Dataset.map = None
    cfg = DataConfig(train=str(Path(tmp) / "a.jsonl"), seq_len=16, cache_dir=str(Path(tmp) / "cache"))
    try:
        results[rank] = load_split(cfg, "train", tok).input_ids.sum().item()
        try:
            load_split(DataConfig(train=str(Path(tmp) / "empty.jsonl"), cache_dir=cfg.cache_dir), "train", tok)
        except DataError as e:
            results[f"err{rank}"] = str(e)
        # No cache: rank 1 must tokenize, and fails (no map); rank 0 stops too instead of waiting.
        load_split(DataConfig(train=cfg.train, seq_len=16, cache_dir="none"), "train", tok)
    except (DataError, TypeError) as e:
        results[f"late{rank}"] = str(e)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_rank_zero_tokenizes_and_the_others_read_its_cache(tmp_path: Path, tokenizer_dir: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # spawned ranks import this module by name
    jsonl(tmp_path / "a.jsonl", [{"text": t} for t in TEXTS * 10])
    (tmp_path / "empty.jsonl").write_text("")
    with mp.Manager() as m:
        results = m.dict()
        mp.spawn(_rank_worker, args=(free_port(), str(tmp_path), str(tokenizer_dir), results), nprocs=2, join=True)
        out = dict(results)
    assert out[0] == out[1] > 0  # the same windows on both ranks, rank 1 from the cache
    assert "file is empty" in out["err0"] and out["err0"] == out["err1"]  # rank 0's error stops both
    assert "another rank could not prepare its data" in out["late0"] and "late1" in out


@pytest.mark.distributed
def test_cli_instruction_mix_unpacked(make_model, tmp_path: Path):
    """The trainer on alpaca records mixed with plain text, unpacked rows with padding, 1 process."""
    qa = jsonl(tmp_path / "qa.jsonl", [alpaca_record(t, extra=str(i)) for i in range(8) for t in TEXTS])
    out = tmp_path / "out"
    text = ROOT / "pipeline" / "demo" / "text" / "valid.txt"
    cfg = write_config(
        tmp_path / "c.yaml",
        make_model("llama"),
        out,
        data={
            "train": str(qa),
            "mix": [{"path": str(text), "format": "text", "weight": 2}],
            "eval": str(qa),
            "seq_len": 96,
            "packing": False,
            "truncation": True,
            "cache_dir": str(tmp_path / "cache"),
        },
        train={"steps": 4},
    )
    proc = run_pipeline(cfg)
    assert proc.returncode == 0, proc.stderr[-4000:]
    s = read_summary(out)
    assert s["eval_ppl_before"] > 1 and s["eval_ppl_after"] > 1
    assert "data.eval=" in proc.stderr and "cache hit" in proc.stderr  # eval = train file, same settings
