"""Rank pruning under ZeRO-3 on 1 and 2 ranks: removed components stay zero, the saved adapter is
physically smaller and reloads in PEFT giving the trained model's outputs."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, free_port, write_config
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pipeline.model.structure import discover
from pipeline.pruning.masks import Masks

pytestmark = pytest.mark.distributed
SCRIPT = ROOT / "tests" / "scripts" / "rank_pruning_run.py"


@pytest.mark.parametrize("ranks", [1, 2])
def test_rank_pruning_zero3(ranks, make_model, tmp_path):
    out = tmp_path / "out"
    model_dir = make_model("llama")
    cfg = write_config(
        tmp_path / "c.yaml",
        model_dir,
        out,
        model={"quantization": "none"},
        lora={
            "rank_dropout": 0.2,
            "rank_pruning": {"enabled": True, "init_r": 8, "target_r": 2, "every": 2, "warmup": 0.1, "cooldown": 0.5},
        },
        train={"steps": 10},
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(SCRIPT), str(cfg)]
    if ranks == 2:
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            str(SCRIPT),
            str(cfg),
        ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    check = json.loads((out / "check.json").read_text())
    assert check["bad"] == [] and check["dead"] > 0
    summary = json.loads((out / "summary.json").read_text())
    # The saved adapter holds exactly the kept ranks ...
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    for module, r in summary["adapter_ranks"].items():
        assert adapter[f"base_model.model.{module}.lora_A.weight"].shape[0] == r
        assert adapter[f"base_model.model.{module}.lora_B.weight"].shape[1] == r
    # The parameter budget of plain LoRA at r=2, met within one component.
    sizes = [
        adapter[f"base_model.model.{m}.lora_A.weight"].shape[1]
        + adapter[f"base_model.model.{m}.lora_B.weight"].shape[0]
        for m in summary["adapter_ranks"]
    ]
    assert 2 * sum(sizes) - max(sizes) < summary["adapter_params"] <= 2 * sum(sizes)
    # ... and PEFT reloads it into the same function the run ended with (masks included).
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter").eval()
    masks = Masks(discover(peft))
    masks.load_state_dict(load_file(out / "masks.safetensors"))
    masks.attach(peft)
    with torch.no_grad():
        logits = peft(input_ids=torch.arange(64).view(2, 32) % 500).logits
    torch.testing.assert_close(logits, torch.load(out / "check_logits.pt"), rtol=1e-4, atol=1e-4)
