"""Launches without a torch launcher: mpiexec (mpi4py discovery) and a bare srun (Slurm variables)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, free_port, read_summary, write_config

from pipeline.dist import launch_env as L

MPIEXEC = Path(sys.executable).parent / "mpiexec"  # the mpich wheel's, matching mpi4py's MPI
TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _clean_env(**extra: str) -> dict[str, str]:
    drop = (*TORCH_VARS, *L.MPI_RANK_VARS, "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def _srun_task(rank: int, world: int = 2, **extra: str) -> dict[str, str]:
    """The variables srun sets for one task of a step (on one node, localhost)."""
    task = {"SLURM_PROCID": rank, "SLURM_LOCALID": rank, "SLURM_NTASKS": world, "SLURM_STEP_NUM_TASKS": world}
    task.update(SLURM_STEP_ID=0, SLURM_JOB_ID=777, SLURM_STEP_NODELIST="localhost")
    return {**{k: str(v) for k, v in task.items()}, **extra}


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [("gpu[07-09,12],cpu1", "gpu07"), ("n1,n2", "n1"), ("rack[2-3]-node[01-04]", "rack2-node01"), ("solo", "solo")],
)
def test_first_host(nodelist: str, first: str):
    assert L.first_host(nodelist) == first


def test_srun_layout_and_precedence():
    env = _srun_task(1, world=16, SLURM_LOCALID="1", SLURM_STEP_NODELIST="gpu[03-04]")
    assert L.discover(env) == "slurm"
    want = dict(RANK="1", WORLD_SIZE="16", LOCAL_RANK="1", MASTER_ADDR="gpu03", MASTER_PORT="20777")
    assert {k: env[k] for k in TORCH_VARS} == want
    # MASTER_* from the environment win; one GPU bound per task means device 0.
    env = _srun_task(3, MASTER_ADDR="head", MASTER_PORT="1234", CUDA_VISIBLE_DEVICES="5")
    L.discover(env)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"], env["LOCAL_RANK"]) == ("head", "1234", "0")
    # The batch script itself has SLURM_PROCID but no SLURM_STEP_ID: a plain python stays a world of one.
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "777"}
    assert L.discover(batch) == "single" and batch["WORLD_SIZE"] == "1"
    assert L.discover(_srun_task(0, world=1)) == "single"  # srun -n 1 python ...: no rendezvous port to share
    # A torch launcher's variables win over everything.
    launched = _srun_task(5, RANK="2", WORLD_SIZE="8", MASTER_ADDR="a", MASTER_PORT="1", PMI_RANK="5")
    assert L.discover(launched) == "launcher" and launched["RANK"] == "2" and launched["LOCAL_RANK"] == "0"


_DISCOVER = (
    "import json, os; from pipeline.dist.launch_env import discover; s = discover(os.environ); "
    "print(json.dumps({'source': s, **{k: os.environ[k] for k in ('RANK', 'WORLD_SIZE', 'MASTER_PORT')}}))"
)


def _discover(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _DISCOVER], env=env, cwd=ROOT, capture_output=True, text=True)


def test_mpi_singleton_falls_back_or_stops():
    """PMI variables the MPI library cannot use (mpi4py sees a world of one): Slurm's layout, else an error."""
    got = _discover(_clean_env(PMI_RANK="1", PMI_SIZE="2", **_srun_task(1)))
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == {"source": "slurm", "RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": "20777"}
    stop = _discover(_clean_env(PMI_RANK="1", PMI_SIZE="2"))
    assert stop.returncode != 0 and "mpi4py sees a world of one" in stop.stderr


_INIT = """
import json, os, torch
from pipeline.dist import comm as D
D.init(timeout_minutes=2)
t = torch.tensor([float(D.rank() + 1)]); D.all_reduce_sum(t)
print(json.dumps({"rank": D.rank(), "world": D.world_size(), "sum": t.item(), "local": os.environ["LOCAL_RANK"]}))
D.shutdown()
"""


@pytest.mark.distributed
def test_bare_srun_pmix_two_ranks():
    """srun --mpi=pmix style: PMIX_RANK + Slurm task variables, no launcher; MPI is not touched."""
    port = str(free_port())
    procs = []
    for r in (0, 1):
        env = _clean_env(PMIX_RANK=str(r), MASTER_PORT=port, **_srun_task(r))
        cmd = [sys.executable, "-c", _INIT]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    got = sorted(json.loads(out.strip().splitlines()[-1])["rank"] for out, _ in outs)
    assert got == [0, 1] and all(json.loads(o.strip().splitlines()[-1])["sum"] == 3.0 for o, _ in outs)


@pytest.mark.distributed
@pytest.mark.skipif(not MPIEXEC.exists(), reason="no mpiexec next to the interpreter (pip install mpich)")
def test_mpiexec_two_ranks_train_and_prune(make_model, tmp_path):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", make_model("llama"), out, train={"steps": 4})
    cmd = [str(MPIEXEC), "-n", "2", sys.executable, str(ROOT / "pipeline" / "run.py"), "--config", str(cfg)]
    proc = subprocess.run(cmd, env=_clean_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    summary = read_summary(out)
    assert summary["world_size"] == 2 and summary["global_batch"] == 2 * 2
    assert summary["achieved_sparsity"] == pytest.approx(0.5, abs=0.03)
    assert summary["decision_steps"] and summary["score_events"] > 0
