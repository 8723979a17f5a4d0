"""Run and checkpoint directories built without training, for the export and refusal tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import DEMO_TEXT, DEMO_VALID
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from pipeline.config.schema import config_from_dict, save_config
from pipeline.model.structure import structure_from_config
from pipeline.pruning.masks import Masks
from pipeline.train.checkpoint import RUN_CONFIG

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
H, KV, D, HIDDEN, INTER = 8, 4, 8, 64, 96  # the conftest tiny models


def _heads(groups: list[list[int]] | None = None, query: list[list[int]] | None = None) -> torch.Tensor:
    """[2, 8] head mask from kept KV groups per layer, or from kept query heads per layer."""
    m = torch.zeros(2, H)
    for layer, kept in enumerate(query or []):
        m[layer, kept] = 1
    for layer, kept in enumerate(groups or []):
        for g in kept:
            m[layer, 2 * g : 2 * g + 2] = 1
    return m


def _channels(counts: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    m = torch.zeros(2, INTER)
    for layer, n in enumerate(counts):
        m[layer, torch.randperm(INTER, generator=g)[:n]] = 1
    return m


MASKS = {  # name -> (scope, head_unit, heads, channels)
    "uniform_kv": ("uniform", "kv_group", _heads(groups=[[0, 2], [1, 3]]), _channels([48, 48])),
    "global_kv": ("global", "kv_group", _heads(groups=[[0, 1, 3], [2]]), _channels([30, 70])),
    "uniform_query": ("uniform", "query", _heads(query=[[0, 3, 4, 7], [1, 2, 5, 6]]), _channels([48, 48])),
    # Equal widths, but 6 heads: LlamaConfig refuses hidden_size % heads != 0, so per-layer code is used.
    "uniform_6heads": ("uniform", "kv_group", _heads(groups=[[0, 1, 2], [1, 2, 3]]), _channels([60, 60])),
    # Not produced by the pipeline: uneven query heads per group, a layer without channels (padded at 0).
    "odd": ("global", "kv_group", _heads(query=[[0, 1, 2], list(range(8))]), _channels([50, 0])),
}


def make_run(
    root: Path, model_dir: Path, masks: str, quantization: str = "nf4", lora: dict | None = None, seed: int = 0
) -> Path:
    """A finished run directory like pipeline/train/checkpoint.py writes, without training."""
    scope, unit, heads, channels = MASKS[masks]
    run = root / f"run-{masks}-{quantization}"
    run.mkdir(parents=True)
    cfg = config_from_dict(
        {
            "model": {"path": str(model_dir), "quantization": quantization, "dtype": "fp32"},
            "lora": {"r": 4, "alpha": 8},
            "data": {"train": str(DEMO_TEXT), "eval": str(DEMO_VALID), "seq_len": 32},
            "pruning": {"scope": scope, "head_unit": unit},
            "output": {"dir": str(run)},
        }
    )
    save_config(cfg, run / RUN_CONFIG)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=PROJ, **(lora or {})))
    for n, p in peft.named_parameters():
        if "lora_B" in n:  # as after training: B != 0, so the merge matters
            torch.nn.init.normal_(p, std=0.05)
    peft.save_pretrained(run / "adapter")
    save_file({"heads": heads, "channels": channels}, run / "masks.safetensors")
    s = structure_from_config(model.config, unit)
    m = Masks(s)
    m.load_state_dict({"heads": heads, "channels": channels})
    summary = {
        "model_path": str(model_dir),
        "model_type": s.model_type,
        "structure": s.to_dict(),
        "quantization": quantization,
        "criterion": "lora",
        "scope": scope,
        "target_sparsity": 0.5,
        "achieved_sparsity": m.sparsity(),
        "prunable_params": s.prunable_params,
        "pruned_params": m.pruned_params(),
        "kept_heads_per_layer": (heads > 0).sum(-1).tolist(),
        "kept_kv_heads_per_layer": (heads > 0).view(2, KV, 2).any(-1).sum(-1).tolist(),
        "kept_channels_per_layer": (channels > 0).sum(-1).tolist(),
        "steps": 6,
        "tokens_seen": 384,
        "eval_ppl_before": 500.0,
        "eval_ppl_after": 400.0,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def fake_checkpoint(root: Path, step: int) -> Path:
    """A checkpoint directory with the files a manifest must cover (contents are irrelevant here)."""
    from pipeline.train.checkpoint import STATE, TENSORS, step_name, write_manifest

    d = root / step_name(step)
    (d / "engine").mkdir(parents=True)
    (d / "engine" / "optim.pt").write_bytes(bytes(range(256)) * 4)
    (d / STATE).write_text(json.dumps({"step": step}))
    (d / TENSORS).write_bytes(b"tensors")
    write_manifest(d)
    return d
