from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from pipeline.data.dataset import DataError, TrainBatches, Windows, eval_batches, load_texts, tokenize_to_blocks


def _windows(batches: list[TrainBatches], step: int, gas: int) -> list[int]:
    out = []
    for b in batches:
        for m in range(gas):
            out += b.micro_batch(step, m)["input_ids"][:, 0].tolist()
    return sorted(out)


def test_global_batch_is_the_same_for_any_launch_shape():
    blocks = torch.arange(40).view(40, 1).repeat(1, 4)
    one = [TrainBatches(blocks, 2, 2, world=1, rank=0, seed=3)]
    two = [TrainBatches(blocks, 2, 1, world=2, rank=r, seed=3) for r in range(2)]
    for step in (1, 2, 11):  # step 11 wraps into the second epoch
        assert _windows(one, step, 2) == _windows(two, step, 1)
    # Ranks see disjoint windows within a step.
    a, b = (set(t.micro_batch(1, 0)["input_ids"][:, 0].tolist()) for t in two)
    assert not a & b


def test_ranks_see_disjoint_windows_over_an_epoch():
    n = 24
    ids = torch.arange(n).view(n, 1).repeat(1, 4)
    w = Windows(ids, ids, position_ids=torch.arange(4).repeat(n, 1))
    ranks = [TrainBatches(w, 3, 2, world=2, rank=r, seed=1) for r in range(2)]
    per_rank = [[i for step in (1, 2) for i in _windows([r], step, 2)] for r in ranks]  # 2 steps of 12 = an epoch
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == list(range(n))  # every window once per epoch
    batch = ranks[0].micro_batch(1, 0)
    assert set(batch) == {"input_ids", "labels", "position_ids"} and batch["input_ids"].dtype == torch.long


def test_eval_batches_are_equal_in_number_on_every_rank():
    blocks = torch.zeros(7, 4, dtype=torch.long)
    per_rank = [eval_batches(blocks, 2, world=2, rank=r) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    counted = sum(len(x["input_ids"]) for r in per_rank for x, real in r if real)
    assert counted == 7


def test_padded_rows_are_cut_to_the_longest_in_the_batch():
    ids = torch.arange(12).view(2, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    w = Windows(ids, ids, attention_mask=mask)
    assert w.batch([0, 1])["input_ids"].shape == (2, 3) and w.batch([1])["attention_mask"].shape == (1, 2)


def test_text_and_jsonl(tmp_path: Path, tokenizer_dir: Path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    txt = tmp_path / "a.txt"
    txt.write_text("hello world\n" * 50)
    blocks = tokenize_to_blocks(load_texts(str(txt), "text", "data.train"), tok, 16, "data.train", str(txt))
    assert blocks.shape[1] == 16 and blocks.shape[0] >= 1
    js = tmp_path / "a.jsonl"
    js.write_text('{"body": "hello world"}\n' * 50)
    with pytest.raises(DataError, match="no field 'text'.*data.text_field"):
        load_texts(str(js), "text", "data.train")
    assert len(load_texts(str(js), "body", "data.train")) == 50


def test_bad_files(tmp_path: Path, tokenizer_dir: Path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    with pytest.raises(DataError, match="data.train=.*file not found"):
        load_texts(str(tmp_path / "missing.txt"), "text", "data.train")
    empty = tmp_path / "e.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_texts(str(empty), "text", "data.train")
    short = tmp_path / "s.txt"
    short.write_text("hi")
    with pytest.raises(DataError, match="fewer than one sequence of data.seq_len=64"):
        tokenize_to_blocks(load_texts(str(short), "text", "data.train"), tok, 64, "data.train", str(short))
