"""Collectives of distributed.py on 2 gloo processes started from the test."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

pytestmark = pytest.mark.distributed


def _worker(rank: int, port: int, same: bool, results) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )
    from pipeline.dist import comm as D

    D.init(timeout_minutes=1)
    masks = torch.ones(3, 4)
    if not same and rank == 1:
        masks[2, 1] = 0
    try:
        D.verify_identical([masks], "masks")
        results[rank] = "ok"
    except RuntimeError as e:
        results[rank] = str(e)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("same", [True, False])
def test_mask_hash_guard(same: bool):
    with mp.Manager() as m:
        results = m.dict()
        mp.spawn(_worker, args=(free_port(), same, results), nprocs=2, join=True)
        out = dict(results)
    if same:
        assert out == {0: "ok", 1: "ok"}
    else:  # both ranks stop, each with the message
        assert all("masks differ across ranks" in out[r] for r in (0, 1))
