"""Rank layout for launches without a torch launcher: ``mpiexec``/``mpirun`` (mpi4py) or a bare ``srun``.

The deepspeed launcher and torchrun export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``
and ``MASTER_PORT``; then there is nothing to do. Otherwise, in this order:

* **MPI** (``OMPI_COMM_WORLD_RANK``, ``PMI_RANK`` or ``PMIX_RANK`` set): rank and world size come
  from mpi4py's ``COMM_WORLD``, the local rank from a shared-memory split (no assumption that host
  names are unique), and rank 0 broadcasts the rendezvous: ``MASTER_ADDR``/``MASTER_PORT`` from the
  environment when set, else 127.0.0.1 on a single node or this host's address, and a free port
  (DeepSpeed's own discovery always takes port 29500, which collides between jobs sharing a node).
  MPI variables win over Slurm ones because ``mpiexec`` inside an allocation starts its proxies
  with ``srun``, so ``SLURM_PROCID`` there numbers nodes, not ranks.
  If mpi4py sees a world of one while the launcher declared more (an MPI library that cannot talk to
  the launcher's PMI), every rank falls back to the Slurm variables when they exist and stops
  otherwise, rather than run N independent copies.
  Only ``PMIX_RANK`` inside an srun step (``srun --mpi=pmix``) skips MPI: Slurm's variables are exact
  there, and an MPI library without PMIx support (the MPICH wheel) aborts the process in MPI_Init.
* **Bare srun** (``SLURM_PROCID``, ``SLURM_STEP_ID`` and ``SLURM_STEP_NUM_TASKS``/``SLURM_NTASKS``;
  ``SLURM_STEP_ID`` is set by srun only, so a plain ``python`` in a batch script, which also sees
  ``SLURM_PROCID=0``, stays a world of one): rank ``SLURM_PROCID``, local rank ``SLURM_LOCALID``,
  master the first host of the step's node list, port ``20000 + SLURM_JOB_ID % 20000`` (the same
  rule as ``slurm/prune_70b.sh``) unless ``MASTER_PORT`` is set. A one-task step is a world of one.
* Otherwise a world of one (127.0.0.1 and a free port).

When exactly one GPU is visible (``srun --gpus-per-task=1`` style binding), the local rank used
to pick the device is 0 whatever the task's local id.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping, MutableMapping

TORCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
_MPI_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


class LaunchError(RuntimeError):
    """The launcher's variables cannot be turned into a consistent rank layout."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def torch_launched(env: Mapping[str, str]) -> bool:
    return all(v in env for v in TORCH_VARS)


def under_mpi(env: Mapping[str, str]) -> bool:
    return any(v in env for v in MPI_RANK_VARS)


def in_srun_step(env: Mapping[str, str]) -> bool:
    return "SLURM_PROCID" in env and "SLURM_STEP_ID" in env and _slurm_world(env) is not None


def _slurm_world(env: Mapping[str, str]) -> str | None:
    return env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")


def first_host(nodelist: str) -> str:
    """First host of a Slurm node list without scontrol: ``gpu[07-09,12],cpu1`` -> ``gpu07``."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]  # commas outside brackets separate hosts
    return re.sub(r"\[([^\],-]+)[^\]]*\]", r"\1", first)


def slurm_port(env: Mapping[str, str]) -> int:
    """Same on every task of a job and different between jobs sharing a node (mostly)."""
    return 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000


def _device_local_rank(local_rank: int, env: Mapping[str, str]) -> int:
    visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return 0 if len(visible) == 1 else local_rank


def slurm_layout(env: Mapping[str, str]) -> dict[str, str]:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
    local = int(env.get("SLURM_LOCALID", "0"))
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": str(_slurm_world(env)),
        "LOCAL_RANK": str(_device_local_rank(local, env)),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
        "MASTER_PORT": env.get("MASTER_PORT") or str(slurm_port(env)),
    }


def _declared_world(env: Mapping[str, str]) -> int:
    for v in _MPI_SIZE_VARS:
        if v in env:
            return int(env[v])
    world = _slurm_world(env)  # srun --mpi=pmix exports no size of its own
    return int(world) if "PMIX_RANK" in env and world else 1


def _env_rank(env: Mapping[str, str]) -> int:
    return next(int(env[v]) for v in MPI_RANK_VARS if v in env)


def host_address() -> str:
    """An address of this host for other nodes: a non-loopback IPv4 of its name, else the name."""
    name = socket.gethostname()
    try:
        addrs = sorted({ai[4][0] for ai in socket.getaddrinfo(name, None, socket.AF_INET)})
    except OSError:
        return name
    routable = [a for a in addrs if not a.startswith("127.")]
    return routable[0] if routable else name


def mpi_layout(env: Mapping[str, str]) -> dict[str, str] | None:
    """Layout from mpi4py (collective over COMM_WORLD); None when MPI sees a world of one by mistake."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size == 1 and (_declared_world(env) > 1 or _env_rank(env) > 0):
        return None  # the same on every rank, so all of them take the same fallback
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = node.Get_rank(), node.Get_size()
    node.Free()
    rendezvous = None
    if rank == 0:
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if local_size == size else host_address())
        rendezvous = (addr, env.get("MASTER_PORT") or str(free_port()))
    addr, port = comm.bcast(rendezvous, root=0)
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(size),
        "LOCAL_RANK": str(_device_local_rank(local_rank, env)),
        "MASTER_ADDR": addr,
        "MASTER_PORT": port,
    }


def _pmix_under_srun(env: Mapping[str, str]) -> bool:
    return "PMIX_RANK" in env and "OMPI_COMM_WORLD_RANK" not in env and "PMI_RANK" not in env and in_srun_step(env)


def discover(env: MutableMapping[str, str]) -> str:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in ``env``; returns the source used."""
    if torch_launched(env):
        env.setdefault("LOCAL_RANK", "0")
        return "launcher"
    if under_mpi(env) and not _pmix_under_srun(env):
        layout = mpi_layout(env)
        if layout is not None:
            env.update(layout)
            return "mpi"
        if not in_srun_step(env):
            raise LaunchError(
                f"launched under MPI as rank {_env_rank(env)} of {_declared_world(env)}, but mpi4py sees a world of "
                "one: its MPI library cannot reach this launcher. Use the mpiexec of the MPI that mpi4py was "
                "built against (the venv's mpiexec for the mpich wheel), or launch with deepspeed/torchrun."
            )
    if in_srun_step(env) and int(str(_slurm_world(env))) > 1:
        env.update(slurm_layout(env))
        return "slurm"
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))
    return "single"
