"""Compact a finished run: merge the LoRA adapter into the base and cut out the pruned heads and channels.

Input is a run directory (see checkpoint.py), output a smaller Hugging Face model directory. What the
masked model computed is reproduced exactly: a head mask multiplies the o_proj input and a channel mask
the down_proj input, so a unit with mask 0 contributes nothing and its q/k/v/gate/up rows and o/down
columns can go; mask values are folded into the kept o/down columns, so the output is exact for any
non-zero mask value too. GQA: a KV head stays while any of its query heads does, and every kept KV
head keeps the same number of query heads (HF repeat_kv); a group with fewer kept heads is padded
with pruned heads at mask 0 (exact, warned about; the pipeline's masks never need it).

Memory: the base is read with ``safetensors.safe_open`` one decoder layer at a time and the result is
written in shards, so about one shard of the compact model plus one layer of the base is resident.
Everything is written into a temporary sibling directory that is renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from . import modeling_pruned
from .cards import TAGS, base_license, base_model_id, card, eval_results, lm_eval_table
from .checkpoint import LEGACY_RUN_CONFIG, RUN_CONFIG
from .config import Config, InputError, config_from_dict
from .fingerprint import compare, model_fingerprint
from .masks import Masks
from .model_loading import resolve_dtype
from .model_source import ModelError, resolve_model_dir, source_record
from .rundir import check_replaceable, clean_stale_staging, staging_dir, terminate_as_exception
from .structure import Structure, decoder_layers, layer_modules, structure_from_config

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NF4_BLOCKSIZE = 64  # bitsandbytes' Params4bit default, which transformers' 4-bit loader uses
_STRUCTURE_KEYS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
)


class ExportError(InputError):
    """A run, base or output directory that cannot be compacted; the message names the file and the fix."""


# --------------------------------------------------------------------------------------------- inputs


class BaseWeights:
    """Lazy reader of a (possibly sharded) safetensors checkpoint: one tensor in memory at a time."""

    def __init__(self, model_dir: Path) -> None:
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif single.is_file():
            with safe_open(str(single), "pt") as f:
                weight_map = dict.fromkeys(f.keys(), single.name)
        else:
            raise ExportError(
                f"{model_dir}: no model.safetensors or model.safetensors.index.json; compact streams safetensors "
                "only: load the base and save it with save_pretrained(..., safe_serialization=True)"
            )
        self._files = {name: safe_open(str(model_dir / name), "pt") for name in sorted(set(weight_map.values()))}
        self._where = weight_map

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._files[self._where[key]].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self._files[self._where[key]].get_tensor(key)

    def numel(self) -> int:
        return sum(math.prod(self.shape(k)) for k in self._where)


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


class LoraAdapter:
    """LoRA factors of a saved PEFT adapter, read lazily, with per-module scaling.

    The scaling is PEFT's: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), where ``r`` and ``alpha``
    come from ``rank_pattern`` / ``alpha_pattern`` when a pattern matches the module name.
    """

    def __init__(self, adapter_dir: Path) -> None:
        conf_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
        for p in (conf_path, weights):
            if not p.is_file():
                raise ExportError(f"{p} is missing: the run did not save its adapter; rerun training or restore it")
        self.path = weights
        conf = json.loads(conf_path.read_text())
        if conf.get("peft_type", "LORA") != "LORA":
            raise ExportError(f"{conf_path}: peft_type={conf.get('peft_type')!r}; only LoRA adapters can be merged")
        unsupported = [k for k in ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save") if conf.get(k)]
        if unsupported:
            raise ExportError(f"{conf_path}: {unsupported} set; compact merges plain LoRA adapters only")
        self.r, self.alpha = int(conf["r"]), float(conf["lora_alpha"])
        self.rank_pattern: dict[str, int] = conf.get("rank_pattern") or {}
        self.alpha_pattern: dict[str, float] = conf.get("alpha_pattern") or {}
        self.rslora = bool(conf.get("use_rslora", False))
        self._f = safe_open(str(weights), "pt")
        self._keys: dict[str, dict[str, str]] = {}
        odd = []
        names: list[str] = self._f.keys()
        for key in names:
            m = _LORA_KEY.match(key)
            if m:
                self._keys.setdefault(m["module"], {})[m["ab"]] = key
            else:
                odd.append(key)
        if odd:
            raise ExportError(f"{weights}: tensors {odd[:4]} are not LoRA A/B weights; compact cannot merge them")
        if not self._keys:
            raise ExportError(f"{weights}: holds no LoRA weights; is this the run's adapter?")

    @property
    def modules(self) -> list[str]:
        return list(self._keys)

    @staticmethod
    def _pattern(patterns: dict[str, Any], module: str) -> Any:
        """PEFT's rule: a pattern applies when it matches the end of the dotted module name."""
        for key, value in patterns.items():
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return None

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A [r, in], B [out, r], scaling) in fp32, or None when the module has no adapter."""
        keys = self._keys.get(module)
        if keys is None:
            return None
        if set(keys) != {"A", "B"}:
            raise ExportError(f"{self.path}: {module} has lora_{next(iter(keys))} but not its pair")
        a, b = self._f.get_tensor(keys["A"]).float(), self._f.get_tensor(keys["B"]).float()
        r = a.shape[0]
        configured = self._pattern(self.rank_pattern, module) or self.r
        if b.shape[1] != r or r != configured:
            raise ExportError(
                f"{self.path}: {module} has rank {r} (B {tuple(b.shape)}) but adapter_config.json says "
                f"{configured}; the adapter files do not belong together"
            )
        alpha = self._pattern(self.alpha_pattern, module) or self.alpha
        return a, b, alpha / (math.sqrt(r) if self.rslora else r)


@dataclass
class Run:
    """A finished run directory and the base model it was trained on, checked against each other."""

    dir: Path
    cfg: Config
    summary: dict[str, Any]
    base_dir: Path
    base_config: Any
    structure: Structure
    heads: torch.Tensor  # [layers, num_heads] mask values, 0 = pruned
    channels: torch.Tensor  # [layers, intermediate_size]
    adapter: LoraAdapter
    notes: list[str] = field(default_factory=list)  # reported by export

    @property
    def train_dtype(self) -> torch.dtype:
        """The dtype the run's model was loaded in ("auto" resolves as training did on this machine)."""
        return resolve_dtype(self.cfg.model.dtype)


def _read_json(path: Path, fix: str) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"{path} is missing: {fix}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{path}: not valid JSON ({e}); {fix}") from e


def _run_config(path: Path) -> tuple[Config, list[str]]:
    """The run's config; keys this version does not know (a run from another version) are ignored,
    since compact reads only model, lora, data and pruning.head_unit."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ExportError(f"{path}: not valid YAML ({e}); restore the run's {path.name}") from e
    known = Config().to_dict()
    clean: dict[str, dict[str, Any]] = {}
    ignored: list[str] = []
    for section, values in data.items():
        if section not in known or not isinstance(values, dict):
            ignored.append(str(section))
            continue
        clean[section] = {k: v for k, v in values.items() if k in known[section]}
        ignored += [f"{section}.{k}" for k in values if k not in known[section]]
    return config_from_dict(clean, str(path), check_environment=False), ignored


def load_run(run_dir: str | Path, base: str | Path | None = None) -> Run:
    """Read and cross-check everything compact needs; raises ExportError before anything is written."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ExportError(f"--run {run_dir}: not a directory; pass the output.dir of a finished run")
    summary = _read_json(
        run_dir / "summary.json", "the run has not finished (summary.json is written last); wait for it or rerun"
    )
    cfg_path = run_dir / RUN_CONFIG
    if not cfg_path.is_file() and (run_dir / LEGACY_RUN_CONFIG).is_file():  # a run written before the rename
        cfg_path = run_dir / LEGACY_RUN_CONFIG
    if not cfg_path.is_file():
        raise ExportError(f"{run_dir / RUN_CONFIG} is missing: the run directory is incomplete; rerun training")
    cfg, ignored = _run_config(cfg_path)
    given = base if base is not None else cfg.model.path
    try:  # a GGUF file resolves to the same converted directory the run trained on
        base_dir = resolve_model_dir(str(given))
    except ModelError as e:
        src = "--base" if base is not None else f"model.path in {cfg_path}"
        raise ExportError(f"base model ({src}): {e}; pass --base with the model it was trained on") from None
    base_config = AutoConfig.from_pretrained(base_dir)
    head_unit = summary.get("structure", {}).get("head_unit", cfg.pruning.head_unit)
    s = structure_from_config(base_config, head_unit)
    have = {"model_type": s.model_type, **{k: v for k, v in s.to_dict().items() if k in _STRUCTURE_KEYS}}
    want = {
        "model_type": summary.get("model_type"),
        **{k: summary.get("structure", {}).get(k) for k in _STRUCTURE_KEYS},
    }
    diff = {k: (want[k], have[k]) for k in have if want[k] is not None and want[k] != have[k]}
    if diff:
        shown = ", ".join(f"{k} {w} vs {h}" for k, (w, h) in diff.items())
        raise ExportError(
            f"{run_dir / 'summary.json'} was trained on another model than {base_dir} (run vs base: {shown}); "
            "pass --base with the model the run was trained on"
        )
    recorded = summary.get("fingerprints", {}).get("base")
    if recorded is not None:  # same shapes are not enough: the weights must be the ones trained against
        changed = compare({"base": recorded}, {"base": model_fingerprint(base_dir)})
        if changed:
            raise ExportError(
                f"{base_dir} is not the base model the run was trained on ({'; '.join(changed)}, against the "
                f"fingerprints in {run_dir / 'summary.json'}); pass --base with the model it was trained on"
            )
    masks_path = run_dir / "masks.safetensors"
    if not masks_path.is_file():
        raise ExportError(f"{masks_path} is missing: the run did not save its masks; rerun training")
    m = Masks(s)
    try:
        with safe_open(str(masks_path), "pt") as f:
            names: list[str] = f.keys()
            m.load_state_dict({k: f.get_tensor(k) for k in names})
    except ValueError as e:
        raise ExportError(f"{masks_path}: {e}; the masks belong to another model or run") from e
    adapter = LoraAdapter(run_dir / "adapter")
    notes = [f"{cfg_path}: ignored keys unknown to this version: {ignored}"] if ignored else []
    return Run(run_dir, cfg, summary, base_dir, base_config, s, m.heads, m.channels, adapter, notes)


# ----------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class LayerPlan:
    """What one decoder layer keeps, as indices into the original projections."""

    q_heads: torch.Tensor  # kept query heads, ordered by KV head, the same count per kept KV head
    kv_heads: torch.Tensor
    channels: torch.Tensor
    head_scale: torch.Tensor  # mask value per kept query head: folded into the o_proj columns
    channel_scale: torch.Tensor  # mask value per kept channel: folded into the down_proj columns
    padding: int  # units kept at mask 0 only to keep the layer well-formed

    @property
    def num_heads(self) -> int:
        return len(self.q_heads)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_heads)

    @property
    def intermediate_size(self) -> int:
        return len(self.channels)


def plan_layer(heads: torch.Tensor, channels: torch.Tensor, heads_per_group: int) -> LayerPlan:
    """Kept units of one layer from its mask rows (a unit with mask 0 is pruned)."""
    kept = (heads != 0).tolist()
    counts = [sum(kept[g * heads_per_group : (g + 1) * heads_per_group]) for g in range(len(kept) // heads_per_group)]
    kv = [g for g, c in enumerate(counts) if c] or [0]  # never zero heads: keep one group at mask 0
    per_group = max(max(counts), 1)
    q: list[int] = []
    for g in kv:
        members = range(g * heads_per_group, (g + 1) * heads_per_group)
        fill = [h for h in members if kept[h]] + [h for h in members if not kept[h]]
        q += sorted(fill[:per_group])
    ch = (channels != 0).nonzero().flatten()
    ch_padding = 0
    if ch.numel() == 0:  # never zero channels: keep one at mask 0
        ch, ch_padding = torch.zeros(1, dtype=torch.long), 1
    q_t = torch.tensor(q)
    return LayerPlan(
        q_heads=q_t,
        kv_heads=torch.tensor(kv),
        channels=ch,
        head_scale=heads[q_t].float(),
        channel_scale=channels[ch].float(),
        padding=len(q) - sum(kept) + ch_padding,
    )


def plan(run: Run) -> list[LayerPlan]:
    hpg = run.structure.heads_per_group
    return [plan_layer(run.heads[i], run.channels[i], hpg) for i in range(run.structure.num_layers)]


def _rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of the rows/columns of ``units`` that are ``size`` wide each (heads: head_dim)."""
    return (units[:, None] * size + torch.arange(size)).flatten()


# -------------------------------------------------------------------------------------------- weights


def nf4_roundtrip(w: torch.Tensor, dtype: torch.dtype, double_quant: bool) -> torch.Tensor:
    """The weight an NF4 run trained against: quantized as transformers' 4-bit loader does, dequantized."""
    packed, state = bnb.functional.quantize_4bit(
        w.to(dtype).contiguous(),
        blocksize=NF4_BLOCKSIZE,
        compress_statistics=double_quant,
        quant_type="nf4",
        quant_storage=dtype,
    )
    return bnb.functional.dequantize_4bit(packed, state)


class ShardWriter:
    """Accumulates tensors and writes safetensors shards of at most ``max_bytes`` (one tensor may exceed it)."""

    def __init__(self, out_dir: Path, max_bytes: int) -> None:
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self._buf: dict[str, torch.Tensor] = {}
        self._size = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0
        self.numel = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self._buf and self._size + nbytes > self.max_bytes:
            self._flush()
        self._buf[name] = t.contiguous()
        self._size += nbytes
        self.total_bytes += nbytes
        self.numel += t.numel()

    def _flush(self) -> None:
        save_file(self._buf, str(self.out_dir / f"shard-{len(self._shards)}.partial"), metadata={"format": "pt"})
        self._shards.append(list(self._buf))
        self._buf, self._size = {}, 0

    def close(self) -> None:
        """Names the shards ``model-0000i-of-0000n.safetensors`` and writes model.safetensors.index.json."""
        if self._buf or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        umask = os.umask(0)
        os.umask(umask)
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / f"shard-{i}.partial", self.out_dir / final)
            os.chmod(self.out_dir / final, 0o666 & ~umask)  # safetensors writes 0600 files
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def module_names(base_config: Any) -> tuple[list[tuple[str, dict[str, str]]], set[str]]:
    """Per decoder layer: its state-dict prefix and its projections' module names; and the set of
    modules transformers' 4-bit loader quantizes (every nn.Linear but the output embeddings).

    Read from a meta-device instance of the architecture, so no name or layer count is hard-coded.
    """
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(base_config)
    names = {id(m): n for n, m in skeleton.named_modules()}
    layers = [
        (names[id(layer)] + ".", {kind: names[id(mod)] for kind, mod in layer_modules(layer).items()})
        for layer in decoder_layers(skeleton)
    ]
    head = skeleton.get_output_embeddings()
    quantized = {n for n, m in skeleton.named_modules() if isinstance(m, nn.Linear) and m is not head}
    return layers, quantized


@dataclass
class ExportResult:
    out_dir: Path
    stock: bool  # loads as the stock architecture (no trust_remote_code)
    params_before: int
    params_after: int
    plans: list[LayerPlan]
    dtype: torch.dtype
    merge_into: str
    notes: list[str] = field(default_factory=list)

    @property
    def widths(self) -> dict[str, list[int]]:
        return {
            "num_attention_heads": [p.num_heads for p in self.plans],
            "num_key_value_heads": [p.num_kv_heads for p in self.plans],
            "intermediate_size": [p.intermediate_size for p in self.plans],
        }


class _Merger:
    """Produces merged, cut and cast tensors for one base checkpoint and adapter."""

    def __init__(self, run: Run, base: BaseWeights, merge_into: str, dtype: torch.dtype, quantized: set[str]) -> None:
        self.run, self.base, self.dtype = run, base, dtype
        self.nf4 = merge_into == "dequantized" and run.cfg.model.quantization == "nf4"
        self.quantized = quantized
        self.merged: set[str] = set()

    def dense(self, module: str) -> torch.Tensor:
        """The module's weight as the merge target, fp32."""
        w = self.base.get(f"{module}.weight")
        if self.nf4 and module in self.quantized:
            w = nf4_roundtrip(w, self.run.train_dtype, self.run.cfg.model.double_quant)
        return w.float()

    def weight(self, module: str, axis: int | None = None, idx: torch.Tensor | None = None) -> torch.Tensor:
        """``W + s B A`` restricted to rows (axis 0) or columns (axis 1) ``idx``; without a cut, whole."""
        w = self.dense(module)
        lora = self.run.adapter.factors(module)
        if lora is not None:
            a, b, s = lora
            if b.shape[0] != w.shape[0] or a.shape[1] != w.shape[1]:
                raise ExportError(
                    f"{self.run.adapter.path}: {module} adapter is {tuple(b.shape[:1]) + tuple(a.shape[1:])} but "
                    f"{self.run.base_dir} has {tuple(w.shape)}; pass --base with the model the run was trained on"
                )
            self.merged.add(module)
        if axis == 0:
            w = w[idx]
            if lora is not None:
                w += s * (b[idx] @ a)
        elif axis == 1:
            w = w[:, idx]
            if lora is not None:
                w += s * (b @ a[:, idx])
        elif lora is not None:
            w += s * (b @ a)
        return w

    def cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if t.is_floating_point() else t


def _write_weights(
    run: Run, layers: list[tuple[str, dict[str, str]]], plans: list[LayerPlan], merger: _Merger, writer: ShardWriter
) -> None:
    base, base_dir, d = merger.base, run.base_dir, run.structure.head_dim
    done: set[str] = set()
    for (prefix, mods), p in zip(layers, plans, strict=True):
        q_rows, kv_rows = _rows(p.q_heads, d), _rows(p.kv_heads, d)
        cuts = {  # module kind -> (axis, kept indices, scale of the kept columns)
            "q_proj": (0, q_rows, None),
            "k_proj": (0, kv_rows, None),
            "v_proj": (0, kv_rows, None),
            "o_proj": (1, q_rows, p.head_scale.repeat_interleave(d)),
            "gate_proj": (0, p.channels, None),
            "up_proj": (0, p.channels, None),
            "down_proj": (1, p.channels, p.channel_scale),
        }
        for kind, (axis, idx, scale) in cuts.items():
            module = mods[kind]
            if f"{module}.weight" not in base:
                raise ExportError(f"{base_dir}: checkpoint lacks {module}.weight; is it a complete model?")
            w = merger.weight(module, axis, idx)
            if scale is not None:
                w *= scale
            writer.add(f"{module}.weight", merger.cast(w))
            done.add(f"{module}.weight")
            if f"{module}.bias" in base:
                bias = base.get(f"{module}.bias")  # o/down biases act after the cut columns: unchanged
                writer.add(f"{module}.bias", merger.cast(bias[idx] if axis == 0 else bias))
                done.add(f"{module}.bias")
        for key in base:  # norms and whatever else the layer holds
            if key.startswith(prefix) and key not in done:
                writer.add(key, merger.cast(base.get(key)))
                done.add(key)
    for key in base:  # embeddings, final norm, lm_head (merged if it was adapted)
        if key not in done:
            module = key.removesuffix(".weight")
            t = merger.weight(module) if key.endswith(".weight") and module in run.adapter.modules else base.get(key)
            writer.add(key, merger.cast(t))
    missing = sorted(set(run.adapter.modules) - merger.merged)
    if missing:
        raise ExportError(
            f"{run.adapter.path}: adapts {missing[:3]} which {base_dir} does not have; "
            "pass --base with the model the run was trained on"
        )


# --------------------------------------------------------------------------------------- config, card


def compact_config(base_config: Any, plans: list[LayerPlan], head_dim: int, dtype: torch.dtype) -> tuple[Any, str]:
    """The compact model's config and why it needs custom code ("" when the stock class takes it)."""
    widths = {(p.num_heads, p.num_kv_heads, p.intermediate_size) for p in plans}
    data = base_config.to_dict()
    for key in ("architectures", "auto_map", "transformers_version", "model_type", "_name_or_path"):
        data.pop(key, None)
    data.update(head_dim=head_dim, dtype=str(dtype).removeprefix("torch."))
    if len(widths) == 1:
        heads, kv_heads, inter = widths.pop()
        data.update(num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=inter)
        try:
            cfg = type(base_config)(**data)
            cfg.architectures = base_config.architectures
            return cfg, ""
        except (
            ValueError,
            TypeError,
            StrictDataclassError,
        ) as e:  # e.g. LlamaConfig insists that hidden_size % num_attention_heads == 0
            reason = f"the stock {type(base_config).__name__} rejects these widths ({str(e).splitlines()[-1].strip()})"
    else:
        reason = "layers differ in width"
    model_type = base_config.model_type
    if model_type not in modeling_pruned.ARCHITECTURES:
        raise ExportError(
            f"{reason}, which needs per-layer modeling code, available for "
            f"{sorted(modeling_pruned.ARCHITECTURES)} but not {model_type!r}; train with pruning.scope=uniform"
        )
    config_cls, model_cls = modeling_pruned.ARCHITECTURES[model_type]
    cfg = config_cls(
        **data,
        base_model_type=model_type,
        layer_num_attention_heads=[p.num_heads for p in plans],
        layer_num_key_value_heads=[p.num_kv_heads for p in plans],
        layer_intermediate_size=[p.intermediate_size for p in plans],
    )
    module = Path(modeling_pruned.__file__).stem
    cfg.architectures = [model_cls.__name__]
    cfg.auto_map = {
        "AutoConfig": f"{module}.{config_cls.__name__}",
        "AutoModelForCausalLM": f"{module}.{model_cls.__name__}",
    }
    return cfg, reason


def _fmt(x: Any, spec: str = ".4g") -> str:
    return format(x, spec) if isinstance(x, (int, float)) and x == x else str(x)


def _source_text(rec: dict[str, str]) -> str:
    if rec["format"] == "gguf":
        return f"GGUF file `{rec['file']}`, dequantized by transformers (model.path `{rec['given']}`)"
    if rec["format"] == "hub":
        return f"Hugging Face repo `{rec['repo_id']}` (local cache)"
    return f"directory `{rec['given']}`"


def load_snippet(path: Path, stock: bool, tokenizer: bool) -> str:
    """Python that loads the exported model (and generates a few tokens when it has a tokenizer)."""
    remote = "" if stock else ", trust_remote_code=True"
    lines = [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"path = {str(path)!r}  # this folder; its Hub repo id once uploaded",
        f"model = AutoModelForCausalLM.from_pretrained(path{remote})",
    ]
    if tokenizer:
        lines += [
            "tokenizer = AutoTokenizer.from_pretrained(path)",
            'inputs = tokenizer("The", return_tensors="pt")',
            "output = model.generate(**inputs, max_new_tokens=16, do_sample=False)",
            "print(tokenizer.decode(output[0], skip_special_tokens=True))",
        ]
    return "\n".join(lines)


def model_card(run: Run, result: ExportResult, custom_reason: str, tokenizer: bool = True) -> ModelCard:
    s, summ, cfg = run.structure, run.summary, run.cfg
    source = source_record(run.base_dir, str(cfg.model.path))
    base = base_model_id(run.base_dir, str(cfg.model.path))
    rows = "\n".join(
        f"| {i} | {p.num_heads}/{s.num_heads} | {p.num_kv_heads}/{s.num_kv_heads} | "
        f"{p.intermediate_size}/{s.intermediate_size} |"
        for i, p in enumerate(result.plans)
    )
    removed = result.params_before - result.params_after
    arch = (
        f"stock `{run.base_config.model_type}` architecture"
        if result.stock
        else f"per-layer widths ({custom_reason}): modeling code in `modeling_pruned.py`"
    )
    facts = [
        ("criterion / scope", f"{summ.get('criterion')} / {summ.get('scope')}"),
        (
            "target / achieved sparsity (of prunable params)",
            f"{_fmt(summ.get('target_sparsity'))} / {_fmt(summ.get('achieved_sparsity'))}",
        ),
        (
            "parameters before / after",
            f"{result.params_before:,} / {result.params_after:,} (-{removed:,}, {removed / result.params_before:.1%})",
        ),
        ("LoRA", f"r={cfg.lora.r}, alpha={cfg.lora.alpha}, modules {', '.join(cfg.lora.target_modules)}"),
        ("data (train / eval)", f"`{cfg.data.train}` / `{cfg.data.eval}`"),
        ("steps / tokens seen", f"{summ.get('steps')} / {_fmt(summ.get('tokens_seen'), ',')}"),
        (
            "eval perplexity before / after (masked model, training's eval)",
            f"{_fmt(summ.get('eval_ppl_before'))} / {_fmt(summ.get('eval_ppl_after'))}",
        ),
        ("dtype", str(result.dtype).removeprefix("torch.")),
        ("base source", _source_text(source)),
    ]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in facts)
    lm_eval = lm_eval_table(summ)
    lm_eval_text = (
        "\n## lm-evaluation-harness (masked model at the end of training)\n\n"
        "Measured by the run (`eval.lm_eval_tasks`) on the base + adapter + masks it trained; a `dequantized` "
        "merge reproduces that model exactly, an `original` merge differs by the 4-bit error. "
        "`tools/evaluate.py --lm-eval-tasks` measures the compact model itself.\n\n" + lm_eval + "\n"
        if lm_eval
        else ""
    )
    data = ModelCardData(
        base_model=base,
        license=base_license(run.base_dir),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=list(TAGS),
        model_name=result.out_dir.name,
        eval_results=eval_results(summ, cfg.data.eval) or None,
    )
    origin = f"`{base}`" if base else f"the local model `{cfg.model.path}`"
    body = f"""# {result.out_dir.name}

Structurally pruned from {origin} by LoRA-guided
structured pruning while fine-tuning: attention heads (unit: {s.head_unit}) and MLP channels were masked
during LoRA training on a {cfg.model.quantization} base, then the adapter was merged into the
{result.merge_into} base weights and the masked heads and channels were removed. Architecture: {arch}.

```python
{load_snippet(result.out_dir.resolve(), result.stock, tokenizer)}
```

{table}
{lm_eval_text}
Per-layer widths (kept / original):

| layer | query heads | KV heads | MLP channels |
|---|---|---|---|
{rows}
"""
    return card(data, body)


# ---------------------------------------------------------------------------------------------- export


@contextmanager
def staged_output(out_dir: Path, overwrite: bool, protected: list[Path]) -> Iterator[Path]:
    """A temporary sibling of ``out_dir`` that replaces it only if the body succeeds."""
    out = out_dir.resolve()
    for p in protected:
        p = p.resolve()
        if out == p or out in p.parents:
            raise ExportError(f"--out {out_dir} would overwrite {p}; choose another directory")
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out_dir} is a file; choose a directory")
    for note in clean_stale_staging(out):
        print(f"note: {note}")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"--out {out_dir} exists and is not empty; choose another directory or pass --overwrite")
        check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with terminate_as_exception():  # SIGTERM: the staged model is removed too
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = staging_dir(out, "old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _base_dtype(base: BaseWeights) -> torch.dtype:
    floats = [k for k in base if k.endswith(".weight")]
    return base.get(floats[0]).dtype if floats else torch.float32


def export(
    run: Run,
    out_dir: str | Path,
    merge_into: str = "original",
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 2**30,
    overwrite: bool = False,
    check: Callable[[Path, ExportResult], None] | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Write the compact model to ``out_dir``; ``check`` (e.g. verification) runs on the staged
    directory before it is published, so a failed check publishes nothing."""
    if merge_into not in ("original", "dequantized"):
        raise ExportError(f"--merge-into {merge_into}: must be original or dequantized")
    out_dir = Path(out_dir)
    base = BaseWeights(run.base_dir)
    dtype = dtype or _base_dtype(base)
    plans = plan(run)
    notes = list(run.notes)
    if merge_into == "dequantized" and run.cfg.model.quantization == "none":
        notes.append("the run's base was not quantized: dequantized and original are the same merge")
    if merge_into == "dequantized" and run.cfg.model.dtype == "auto":
        notes.append(f"model.dtype=auto: NF4 quantization replayed in {run.train_dtype} (as on this machine)")
    padded = sum(p.padding for p in plans)
    if padded:
        notes.append(f"{padded} pruned unit(s) kept at mask 0 so every kept KV head has the same query heads")
    layers, quantized = module_names(run.base_config)
    with staged_output(out_dir, overwrite, [run.dir, run.base_dir]) as tmp:
        merger = _Merger(run, base, merge_into, dtype, quantized)
        writer = ShardWriter(tmp, max_shard_bytes)
        _write_weights(run, layers, plans, merger, writer)
        writer.close()
        cfg, reason = compact_config(run.base_config, plans, run.structure.head_dim, dtype)
        cfg.save_pretrained(tmp)
        if reason:
            shutil.copyfile(modeling_pruned.__file__, tmp / Path(modeling_pruned.__file__).name)
            notes.append(f"{reason}: wrote modeling_pruned.py; load with trust_remote_code=True")
        if (run.base_dir / "generation_config.json").is_file():
            shutil.copyfile(run.base_dir / "generation_config.json", tmp / "generation_config.json")
        tokenizer = True
        try:
            AutoTokenizer.from_pretrained(run.base_dir).save_pretrained(tmp)
        except (OSError, ValueError) as e:
            tokenizer = False
            notes.append(f"no tokenizer written ({e}); copy it from {run.base_dir}")
        result = ExportResult(out_dir, not reason, base.numel(), writer.numel, plans, dtype, merge_into, notes)
        model_card(run, result, reason, tokenizer).save(tmp / "README.md")
        for note in notes:
            log(f"note: {note}")
        if check is not None:
            check(tmp, result)
    return result
