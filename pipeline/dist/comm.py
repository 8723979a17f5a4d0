"""Every distributed detail lives here: process-group start-up, collectives, ZeRO-3 gathers.

Rule kept by every caller: all ranks make the same collectives in the same order, so helpers
here are called on every rank, even where only one rank uses the result.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad, safe_get_local_grad, safe_set_local_grad


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init(timeout_minutes: float | None = None) -> None:
    """Start the process group for deepspeed/torchrun launches, mpiexec, a bare srun, or a plain single process.

    The timeout is ``DEEPSPEED_TIMEOUT`` minutes when set (slurm/prune_70b.sh sets it), else 30.
    """
    if dist.is_initialized():
        return
    from pipeline.dist.launch_env import discover  # MPI / Slurm layouts: see pipeline/dist/launch_env.py

    # Before set_device: under mpiexec or srun LOCAL_RANK is only known after discovery.
    discover(os.environ)
    if timeout_minutes is None:
        timeout_minutes = float(os.environ.get("DEEPSPEED_TIMEOUT", "30"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(device())
    # Long enough for every rank to load a 4-bit 70B model; a dead peer still ends the job.
    deepspeed.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,  # done above, with a free port instead of DeepSpeed's fixed 29500
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


def shutdown() -> None:
    """Leave the process group after a barrier; without it gloo's threads can abort the interpreter at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# Payload bytes handed to all-reduce by this process, counted in a world of one too (what each rank
# would send); the perf summary reports them per scoring event.
traffic = {"all_reduce": 0}


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op for a world of one)."""
    traffic["all_reduce"] += t.numel() * t.element_size()
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: object, src: int = 0) -> object:
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def comm_device() -> torch.device:
    """Where collectives run: the GPU with NCCL, the CPU with gloo."""
    return device()


def verify_identical(tensors: Iterable[torch.Tensor], what: str) -> None:
    """Stop with a clear error if ranks hold different tensors (one all-reduce of a hash)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    # 62 bits so that both h and -h fit in int64; MAX over (h, -h) gives max and -min at once.
    v = int.from_bytes(h.digest()[:8], "little") >> 2
    t = torch.tensor([v, -v], dtype=torch.int64, device=comm_device())
    traffic["all_reduce"] += t.numel() * t.element_size()
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != v or int(-t[1]) != v:
        raise RuntimeError(
            f"{what} differ across ranks (rank {rank()} hash {v:x}, max {int(t[0]):x}, min {int(-t[1]):x}); "
            "this is a bug: the ranks would prune different units. Stopping."
        )


@contextmanager
def gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Full tensors of ZeRO-3 partitioned parameters inside the block (collective; read-only)."""
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


@contextmanager
def gathered_for_update(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Full tensors inside the block; what rank 0 writes is re-partitioned to every rank on exit."""
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield


def full_grad(param: torch.nn.Parameter) -> torch.Tensor:
    """The gradient averaged over ranks and micro-batches (collective under ZeRO-3).

    Only valid between the boundary ``backward()`` and ``step()``; already averaged, so scores
    built from it must not be all-reduced again as if they were per-rank.
    """
    g = safe_get_full_grad(param)
    if g is None:
        raise RuntimeError("no gradient for a trainable parameter: read it before engine.step()")
    return g


def local_grads_finite(params: list[torch.nn.Parameter]) -> bool:
    """Whether this rank's partitions of the reduced gradients are finite (no communication)."""
    checks = [torch.isfinite(g).all() for p in params if (g := safe_get_local_grad(p)) is not None]
    return bool(torch.stack(checks).all()) if checks else True


def zero_local_grads(params: list[torch.nn.Parameter]) -> None:
    """Zero this rank's gradient partitions before ``step()`` (every rank does it, so the update is void)."""
    for p in params:
        g = safe_get_local_grad(p)
        if g is not None:
            safe_set_local_grad(p, torch.zeros_like(g))
