"""The run directory: the contract with ``tools/compact.py``.

``output.dir`` holds, once a run finishes (``summary.json`` is written last):
  adapter/adapter_model.safetensors, adapter/adapter_config.json  PEFT LoRA adapter (full tensors)
  masks.safetensors   heads [layers, num_attention_heads], channels [layers, intermediate]; 1 = kept
  scores.safetensors  smoothed unit scores (heads [layers, head_units], channels [layers, intermediate])
  config.yaml         the resolved run config
  summary.json        per-layer kept heads/channels, target and achieved sparsity, losses, perplexity
  tb/                 TensorBoard logs
Files are written under a temporary name and renamed, so a crash never leaves a half file under
a final name.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from . import distributed as D
from .config import Config, InputError, save_config


class OutputError(InputError):
    pass


def check_output_dir(cfg: Config) -> None:
    """Refuse to write over a finished run unless asked to."""
    done = Path(cfg.output.dir) / "summary.json"
    if done.exists() and not cfg.output.overwrite:
        raise OutputError(
            f"output.dir={cfg.output.dir} already holds a finished run ({done}); choose another "
            "output.dir or set output.overwrite=true"
        )


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    write(tmp)
    os.replace(tmp, path)


def save_adapter(model: nn.Module, out_dir: Path, alive: dict[str, torch.Tensor] | None = None) -> None:
    """Save the PEFT adapter with full tensors; gathers ZeRO-3 shards (collective on every rank).

    With rank pruning (``alive``: kept components per module path), each module is saved at its
    kept rank: ``rank_pattern`` holds the ranks and ``alpha_pattern`` keeps ``alpha / r`` unchanged.
    """
    named = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    with D.gathered([p for _, p in named]):
        state = {n: p.detach().to("cpu", copy=True) for n, p in named} if D.is_main() else {}
    if not D.is_main():
        return
    peft_cfg = model.peft_config["default"]
    if alive:
        scale = peft_cfg.lora_alpha / peft_cfg.r
        for module, keep in alive.items():
            for key in [k for k in state if k.startswith(f"base_model.model.{module}.lora_")]:
                state[key] = state[key][keep] if ".lora_A." in key else state[key][:, keep]
            r = int(keep.sum())
            peft_cfg.rank_pattern[module] = r
            peft_cfg.alpha_pattern[module] = scale * r
    tmp = out_dir / ".tmp-adapter"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
    final = out_dir / "adapter"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def save_run(
    model: nn.Module,
    cfg: Config,
    masks_sd: dict[str, torch.Tensor],
    scores_sd: dict[str, torch.Tensor],
    summary: dict[str, Any],
    alive: dict[str, torch.Tensor] | None = None,
) -> None:
    out = Path(cfg.output.dir)
    save_adapter(model, out, alive)
    if D.is_main():
        _atomic(out / "masks.safetensors", lambda p: save_file(masks_sd, str(p)))
        _atomic(
            out / "scores.safetensors", lambda p: save_file({k: v.contiguous() for k, v in scores_sd.items()}, str(p))
        )
        _atomic(out / "config.yaml", lambda p: save_config(cfg, p))
        _atomic(out / "summary.json", lambda p: p.write_text(json.dumps(summary, indent=2)))
    D.barrier()
