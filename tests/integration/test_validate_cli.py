"""validate and train refuse bad input in a fresh process, quickly and before distributed start-up."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

DEMO = ROOT / "configs" / "demo.yaml"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _run(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    return proc, time.monotonic() - start


@pytest.mark.distributed
def test_validate_command_is_fast():
    proc, secs = _run("-m", "pipeline", "validate", str(DEMO), "data.train=/nonexistent/train.txt")
    assert proc.returncode == 2, proc.stderr
    assert "data.train=/nonexistent/train.txt" in proc.stderr and secs < 15, secs


@pytest.mark.distributed
def test_run_refuses_a_missing_model_before_start_up(tmp_path: Path):
    proc, secs = _run(
        str(ROOT / "pipeline" / "run.py"),
        "--config",
        str(DEMO),
        "model.path=/nonexistent",
        f"output.dir={tmp_path / 'run'}",
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("model.path=/nonexistent") == 1 and secs < 15, (secs, proc.stderr)
    assert not (tmp_path / "run").exists()
