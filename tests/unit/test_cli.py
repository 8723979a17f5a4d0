"""The ``lora-prune`` console command: dispatch, help, version; the wrappers import the same mains."""

from __future__ import annotations

import importlib
import re
import runpy
import sys

import pytest

import pipeline
from pipeline import cli


def test_version_is_release_plus_commit():
    # A checkout stamps the commit (tests run from one): RELEASE+gSHA[.dirty].
    assert re.fullmatch(r"\d+\.\d+\.\d+\+g[0-9a-f]{12}(\.dirty)?", pipeline.__version__), pipeline.__version__


def test_dispatch_help_and_errors(capsys):
    assert cli.main([]) == 2 and "commands:" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("train", "validate", "compact", "evaluate", "plan", "bench"):
        assert f"  {name} " in out
    assert cli.main(["trian"]) == 2 and "unknown command 'trian'" in capsys.readouterr().err
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"lora-prune {pipeline.__version__}"


@pytest.mark.parametrize("name", ["train", "compact", "evaluate", "plan", "bench"])
def test_subcommand_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0 and f"lora-prune {name}" in capsys.readouterr().out


def test_wrappers_are_the_package_mains():
    # tools/*.py and pipeline/run.py only re-export; no script edits sys.path.
    from conftest import ROOT as root

    for script, (module, _) in {
        "pipeline/run.py": cli.COMMANDS["train"],
        "tools/compact.py": cli.COMMANDS["compact"],
        "tools/evaluate.py": cli.COMMANDS["evaluate"],
        "tools/plan.py": cli.COMMANDS["plan"],
        "tools/bench.py": cli.COMMANDS["bench"],
    }.items():
        ns = runpy.run_path(str(root / script), run_name="not_main")
        assert ns["main"] is importlib.import_module(module).main
    for f in [*(root / "tools").glob("*.py"), *(root / "pipeline").rglob("*.py")]:
        assert "sys.path" not in f.read_text(), f


def test_python_m_pipeline(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["pipeline", "--version"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("pipeline", run_name="__main__")
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"lora-prune {pipeline.__version__}"
