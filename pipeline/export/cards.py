"""Model cards: Hub metadata of the base (``base_model``, ``license``), the adapter's card, eval results.

Cards are written through ``huggingface_hub.ModelCard`` / ``ModelCardData``, so their YAML header is
what the Hub parses. ``base_model`` must be a Hub repo id, never a local folder name: the id the
model came from (``model.path`` = a cached repo id, or a directory inside the Hugging Face cache), an
id recorded in a GGUF file's metadata, or the base's own ``_name_or_path`` in its config.json when
that is an id; otherwise it is left out.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from pipeline import __version__
from pipeline.model.source import _REPO_ID, source_record

TAGS = ["pruning", "structured-pruning", "lora"]
_CACHE_DIR = re.compile(r"^models--([^/]+?)--(.+)$")  # the Hugging Face cache's folder of a repo
_HF_URL = re.compile(r"huggingface\.co/([A-Za-z0-9][\w.-]*/[\w.-]+?)/?$")
_GGUF_ID_KEYS = ("general.source.huggingface.repository", "general.base_model.0.repo_url", "general.source.url")


def _gguf_fields(path: str) -> dict[str, Any]:
    """general.* metadata of a GGUF file (header only), {} when the file is gone or unreadable."""
    if not path or not Path(path).is_file():
        return {}
    try:
        from gguf import GGUFReader

        fields = GGUFReader(path).fields
        return {k: f.contents() for k, f in fields.items() if k.startswith("general.")}
    except (ValueError, OSError, KeyError):
        return {}


def _as_repo_id(text: str) -> str | None:
    m = _HF_URL.search(text)
    text = m.group(1) if m else text
    return text if _REPO_ID.match(text) else None


def _local_path(text: str, model_dir: Path) -> bool:
    p = Path(text).expanduser()
    return p.is_absolute() or text.startswith(".") or p.exists() or (model_dir.parent / p).exists()


def base_model_id(model_dir: Path, given: str) -> str | None:
    """The base's Hub repo id, or None when nothing names one (see the module docstring)."""
    model_dir = Path(model_dir)
    rec = source_record(model_dir, given)
    if rec["format"] == "hub":
        return rec["repo_id"]
    for part in model_dir.resolve().parts:  # model.path inside the cache: .../models--org--name/snapshots/sha
        m = _CACHE_DIR.match(part)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    if rec["format"] == "gguf":
        meta = _gguf_fields(json.loads((model_dir / "source.json").read_text()).get("path", ""))
        for key in _GGUF_ID_KEYS:
            repo = _as_repo_id(str(meta.get(key, "")))
            if repo:
                return repo
    raw = _config_json(model_dir).get("_name_or_path", "")
    if isinstance(raw, str) and _REPO_ID.match(raw) and not _local_path(raw, model_dir):
        return raw
    return None


def _config_json(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def base_license(model_dir: Path) -> str | None:
    """The base's license: from its own card's metadata, its config.json, or its GGUF file's metadata."""
    model_dir = Path(model_dir)
    readme = model_dir / "README.md"
    if readme.is_file():
        try:
            lic = ModelCard.load(readme).data.license
            if lic:
                return str(lic)
        except (ValueError, OSError):
            pass
    lic = _config_json(model_dir).get("license")
    if isinstance(lic, str) and lic:
        return lic
    src = model_dir / "source.json"
    if src.is_file():
        lic = _gguf_fields(json.loads(src.read_text()).get("path", "")).get("general.license")
        if lic:
            return str(lic)
    return None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def eval_results(summary: dict[str, Any], eval_file: str) -> list[EvalResult]:
    """The run's evaluations as Hub eval results: lm-eval metrics (stderr left out) and the perplexity
    training measured on data.eval, both of the masked model at the end of training (the card's body
    says so; the Hub's ``source_name`` would need a URL)."""
    out = [
        EvalResult(
            task_type="text-generation",
            dataset_type=task,
            dataset_name=task,
            metric_type=metric,
            metric_value=round(value, 6),
        )
        for task, metrics in (summary.get("lm_eval") or {}).items()
        for metric, value in metrics.items()
        if "_stderr" not in metric and _finite(value)
    ]
    ppl = summary.get("eval_ppl_after")
    if eval_file and _finite(ppl):
        out.append(
            EvalResult(
                task_type="text-generation",
                dataset_type="text",
                dataset_name=Path(eval_file).name,
                metric_type="perplexity",
                metric_value=round(ppl, 4),
            )
        )
    return out


def lm_eval_table(summary: dict[str, Any]) -> str:
    """Markdown table of the run's lm-eval results ("" when there are none)."""
    res = summary.get("lm_eval") or {}
    rows = []
    for task, metrics in res.items():
        for metric, value in metrics.items():
            if "_stderr" in metric:
                continue
            err = metrics.get(metric.replace("/", "_stderr/", 1) if "/" in metric else f"{metric}_stderr")
            rows.append(f"| {task} | {metric} | {value:.4f} | {f'{err:.4f}' if _finite(err) else '-'} |")
    return "| task | metric | value | stderr |\n|---|---|---|---|\n" + "\n".join(rows) if rows else ""


def card(data: ModelCardData, body: str) -> ModelCard:
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def adapter_card(cfg: Any, summary: dict[str, Any], model_dir: Path) -> ModelCard:
    """The card of the run's adapter/ folder (PEFT writes an empty template there)."""
    lora, p, t, d = cfg.lora, cfg.pruning, cfg.train, cfg.data
    base = base_model_id(model_dir, cfg.model.path)
    data = ModelCardData(
        base_model=base,
        license=base_license(model_dir),
        library_name="peft",
        pipeline_tag="text-generation",
        tags=[*TAGS, "peft"],
    )
    ranks = summary.get("adapter_ranks")
    rank_text = (
        f"per-module ranks after rank pruning (from {lora.rank_pruning.init_r} to an average of "
        f"{lora.rank_pruning.target_r:g}): `rank_pattern` in adapter_config.json"
        if ranks
        else f"r={lora.r}"
    )
    facts = [
        ("base model", f"`{base}`" if base else f"`{cfg.model.path}` (local; no Hub id recorded)"),
        (
            "base during training",
            f"{cfg.model.quantization} quantized, {summary.get('compute_dtype', cfg.model.dtype)}",
        ),
        ("produced by", f"lora-prune-pipeline {summary.get('version', __version__)}"),
        ("LoRA", f"{rank_text}, alpha={lora.alpha:g}, dropout={lora.dropout:g}, rank dropout={lora.rank_dropout:g}"),
        ("target modules", ", ".join(lora.target_modules)),
        ("training data", f"`{d.train}`" + (f" (+{len(d.mix)} mixed sources)" if d.mix else "") + f", {d.format}"),
        ("steps / tokens", f"{t.steps} / {summary.get('tokens_seen', 0):,} ({d.seq_len}-token windows)"),
        (
            "optimizer",
            f"AdamW, lr {t.lr:g}, warm-up {t.warmup_steps} steps, "
            + ("constant" if t.min_lr_ratio == 1.0 else f"cosine to {t.min_lr_ratio:g} x lr"),
        ),
        (
            "pruning",
            f"criterion {p.criterion}, scope {p.scope}, target sparsity {p.target_sparsity:g} "
            f"(achieved {summary.get('achieved_sparsity', float('nan')):.4g} of the prunable parameters)",
        ),
        (
            "distillation",
            (
                "KL from "
                + ("the dense base (adapters and masks off)" if cfg.distill.teacher == "base" else cfg.distill.teacher)
                + f", alpha {cfg.distill.alpha:g}, temperature {cfg.distill.temperature:g}"
            )
            if cfg.distill.enabled
            else "off",
        ),
        (
            "eval perplexity before / after",
            f"{summary.get('eval_ppl_before', float('nan')):.4g} / {summary.get('eval_ppl_after', float('nan')):.4g}"
            + (f" on `{Path(d.eval).name}`" if d.eval else ""),
        ),
    ]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in facts)
    body = f"""# LoRA adapter of a pruning run

This adapter was trained by lora-prune-pipeline **while attention heads and MLP channels of the base
were being masked**. It belongs to the masks in `../masks.safetensors`: loaded onto the dense base
alone (plain `PeftModel.from_pretrained`), it is not the pruned model. To get the pruned model, merge
it and cut the masked units with

```
python tools/compact.py --run {cfg.output.dir} --out COMPACT_DIR
```

{table}

Per-layer kept heads and channels are in `../summary.json`; the full training config in `../resolved_config.yaml`.
"""
    return card(data, body)
