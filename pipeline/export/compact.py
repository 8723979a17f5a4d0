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

import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline import __version__
from pipeline.config.schema import Config, InputError, config_from_dict
from pipeline.export import configuration_decilm, modeling_decilm
from pipeline.export.cards import TAGS, base_license, base_model_id, card, eval_results, lm_eval_table
from pipeline.model.fingerprint import compare, model_fingerprint
from pipeline.model.loading import DTYPES, NF4_BLOCKSIZE, nf4_roundtrip, resolve_dtype  # noqa: F401 (re-exported)
from pipeline.model.source import ModelError, resolve_model_dir, source_record
from pipeline.model.structure import ATTN, MLP, Structure, decoder_layers, layer_modules, structure_from_config
from pipeline.pruning.layer_plan import LayerPlan, Widths, plan_layer, unit_rows
from pipeline.pruning.masks import Masks
from pipeline.train.checkpoint import LEGACY_RUN_CONFIG, RUN_CONFIG, SHRINK_FILE
from pipeline.train.rundir import check_replaceable, clean_stale_staging, staging_dir, terminate_as_exception
from pipeline.train.shrink import COL_SLICED, ShrinkHistory, replay_columns

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
    shrink: ShrinkHistory = field(default_factory=ShrinkHistory)  # cuts made in flight (pruning.shrink)

    @property
    def train_dtype(self) -> torch.dtype:
        """The dtype the run computed in: summary.json's ``compute_dtype``; runs from before it was recorded
        resolve ``model.dtype`` ("auto") as training would on this machine."""
        recorded = self.summary.get("compute_dtype")
        return DTYPES[recorded] if recorded in DTYPES else resolve_dtype(self.cfg.model.dtype)


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
    try:
        shrink = ShrinkHistory.load(run_dir / SHRINK_FILE, s)
    except (KeyError, ValueError, OSError) as e:
        raise ExportError(f"{run_dir / SHRINK_FILE}: unreadable ({e}); restore it from the run") from None
    if summary.get("shrink", {}).get("steps") and not shrink.events:
        raise ExportError(f"{run_dir / SHRINK_FILE} is missing: the run shrank its model; restore it from the run")
    return Run(run_dir, cfg, summary, base_dir, base_config, s, m.heads, m.channels, adapter, notes, shrink)


# ----------------------------------------------------------------------------------------------- plan


def plan(run: Run) -> list[LayerPlan]:
    hpg = run.structure.heads_per_group
    return [plan_layer(run.heads[i], run.channels[i], hpg) for i in range(run.structure.num_layers)]


@dataclass(frozen=True)
class ServedLayer(Widths):
    """One layer as written: indices into the base projections, -1 for a zero unit (zero q/k/v rows,
    zero o/down columns: exact). Query heads come grouped by KV head, ``num_heads // num_kv_heads``
    per group. No heads (channels) at all: the attention (MLP) block is a no-op."""

    q_heads: torch.Tensor
    kv_heads: torch.Tensor
    head_scale: torch.Tensor  # per query head; 0 for a zero head and for a pruned head kept at mask 0
    channels: torch.Tensor
    channel_scale: torch.Tensor

    @property
    def attn_no_op(self) -> bool:
        return self.num_kv_heads == 0

    @property
    def ffn_no_op(self) -> bool:
        return self.intermediate_size == 0

    @property
    def padding(self) -> tuple[int, int, int]:
        """(query heads, KV heads, channels) that compute nothing: zero units and units at mask 0."""
        return int((self.head_scale == 0).sum()), int((self.kv_heads < 0).sum()), int((self.channel_scale == 0).sum())


def _zero_padded(p: LayerPlan, kv_slots: int, group: int) -> ServedLayer:
    """``p`` with ``kv_slots`` KV heads of ``group`` query heads each: the real groups first, each
    topped up with zero query heads, then zero groups."""
    k = p.num_kv_heads
    m = p.num_heads // k if k else 0
    q, scale = [-1] * (kv_slots * group), [0.0] * (kv_slots * group)
    for j in range(k):
        for t in range(m):
            q[j * group + t], scale[j * group + t] = int(p.q_heads[j * m + t]), float(p.head_scale[j * m + t])
    return ServedLayer(
        q_heads=torch.tensor(q, dtype=torch.long),
        kv_heads=torch.tensor(p.kv_heads.tolist() + [-1] * (kv_slots - k), dtype=torch.long),
        head_scale=torch.tensor(scale),
        channels=p.channels,
        channel_scale=p.channel_scale,
    )


def _no_channels(p: LayerPlan, ffn_no_op: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if p.intermediate_size or ffn_no_op:
        return p.channels, p.channel_scale
    return torch.tensor([-1]), torch.zeros(1)  # one zero channel keeps an MLP whose bias must stay


def serve_hf(plans: list[LayerPlan]) -> list[ServedLayer]:
    """Widths as planned; a layer without heads (channels) keeps one zero head (channel)."""
    out = []
    for p in plans:
        s = p if p.num_kv_heads else _zero_padded(p, 1, 1)
        ch, ch_scale = _no_channels(p, ffn_no_op=False)
        out.append(ServedLayer(s.q_heads, s.kv_heads, s.head_scale, ch, ch_scale))
    return out


def serve_decilm(plans: list[LayerPlan], o_bias: bool, mlp_bias: bool) -> list[ServedLayer]:
    """The Nemotron-NAS layout: every attention block has the same number of query heads (the most
    any layer keeps), grouped ``n_heads_in_group`` per KV head, a divisor of that number. A layer
    that keeps fewer is padded with zero query heads inside its groups (the smallest KV count that
    fits), then with zero groups. A fully pruned block becomes a no-op unless a bias would be lost
    (o_proj / down_proj bias), or, for attention, in the first layer (vLLM starts the residual
    stream there)."""
    n = max(max(p.num_heads for p in plans), 1)
    out = []
    for i, p in enumerate(plans):
        if p.num_kv_heads == 0 and i > 0 and not o_bias:
            heads = _zero_padded(p, 0, 0)
        else:
            k, m = p.num_kv_heads, (p.num_heads // p.num_kv_heads if p.num_kv_heads else 0)
            slots = min(d for d in range(max(k, 1), n + 1) if n % d == 0 and n // d >= m)
            heads = _zero_padded(p, slots, n // slots)
        ch, ch_scale = _no_channels(p, ffn_no_op=not mlp_bias)
        out.append(ServedLayer(heads.q_heads, heads.kv_heads, heads.head_scale, ch, ch_scale))
    return out


def _unit_mask(units: torch.Tensor, size: int) -> torch.Tensor:
    return (units >= 0).float().repeat_interleave(size)


# -------------------------------------------------------------------------------------------- weights


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
    format: str  # hf (the base's stock architecture) | nemotron-nas
    params_before: int
    params_after: int  # served: what the directory holds, zero padding included
    plans: list[LayerPlan]
    served: list[ServedLayer]
    dtype: torch.dtype
    merge_into: str
    padding_params: int = 0  # of params_after, the rows and columns that compute nothing
    zero_query_heads: int = 0  # query heads that compute nothing, summed over layers
    head_dim: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def stock(self) -> bool:
        """Loads as the stock architecture (no trust_remote_code)."""
        return self.format == "hf"

    @property
    def params_real(self) -> int:
        return self.params_after - self.padding_params

    @property
    def padding_flops(self) -> str:
        """Forward FLOPs per token spent on padding, as text."""
        text = f"{2 * self.padding_params:,} in the projections"
        if self.zero_query_heads:
            text += f" + {4 * self.head_dim * self.zero_query_heads:,} x context length in attention"
        return text

    @property
    def widths(self) -> dict[str, list[int]]:
        """Served widths per layer (0: a no-op block)."""
        return {
            "num_attention_heads": [p.num_heads for p in self.served],
            "num_key_value_heads": [p.num_kv_heads for p in self.served],
            "intermediate_size": [p.intermediate_size for p in self.served],
        }


def padding_params(served: list[ServedLayer], s: Structure, qkv_bias: bool, mlp_bias: bool) -> int:
    """Parameters of the served layers that compute nothing (zero units, units at mask 0)."""
    h, d = s.hidden_size, s.head_dim
    total = 0
    for p in served:
        q, kv, ch = p.padding
        total += q * (2 * h * d + d * qkv_bias) + kv * 2 * (h * d + d * qkv_bias) + ch * (3 * h + 2 * mlp_bias)
    return total


class _Merger:
    """Produces merged, cut and cast tensors for one base checkpoint and adapter."""

    def __init__(self, run: Run, base: BaseWeights, merge_into: str, dtype: torch.dtype, quantized: set[str]) -> None:
        self.run, self.base, self.dtype = run, base, dtype
        self.nf4 = merge_into == "dequantized" and run.cfg.model.quantization == "nf4"
        self.quantized = quantized
        self.merged: set[str] = set()
        # Column-sliced projections that a shrink re-quantized in training: module name -> the cuts, replayed.
        self.column_cuts: dict[str, list[torch.Tensor]] = {}

    def dense(self, module: str) -> torch.Tensor:
        """The module's weight as the merge target, fp32."""
        w = self.base.get(f"{module}.weight")
        if self.nf4 and module in self.quantized:
            w = nf4_roundtrip(w, self.run.train_dtype, self.run.cfg.model.double_quant)
            if module in self.column_cuts:
                w = replay_columns(w, self.column_cuts[module], self.run.train_dtype, self.run.cfg.model.double_quant)
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
    run: Run,
    layers: list[tuple[str, dict[str, str]]],
    served: list[ServedLayer],
    merger: _Merger,
    writer: ShardWriter,
) -> None:
    base, base_dir, d = merger.base, run.base_dir, run.structure.head_dim
    done: set[str] = set()
    if run.shrink.events and run.cfg.pruning.shrink_columns == "requantize":
        merger.column_cuts = {
            mods[kind]: run.shrink.column_cuts(i, kind) for i, (_, mods) in enumerate(layers) for kind in COL_SLICED
        }
    for (prefix, mods), p in zip(layers, served, strict=True):
        q_rows, kv_rows = unit_rows(p.q_heads, d), unit_rows(p.kv_heads, d)
        q_mask, kv_mask = _unit_mask(p.q_heads, d), _unit_mask(p.kv_heads, d)
        ch_rows, ch_mask = unit_rows(p.channels, 1), _unit_mask(p.channels, 1)
        cuts = {  # module kind -> (axis, kept indices, multiplier of the kept rows/columns)
            "q_proj": (0, q_rows, q_mask),
            "k_proj": (0, kv_rows, kv_mask),
            "v_proj": (0, kv_rows, kv_mask),
            "o_proj": (1, q_rows, p.head_scale.repeat_interleave(d)),
            "gate_proj": (0, ch_rows, ch_mask),
            "up_proj": (0, ch_rows, ch_mask),
            "down_proj": (1, ch_rows, p.channel_scale),
        }
        dropped = {"input_layernorm"} if p.attn_no_op else set()
        dropped |= {"post_attention_layernorm"} if p.ffn_no_op else set()
        for kind, (axis, idx, mult) in cuts.items():
            module = mods[kind]
            if f"{module}.weight" not in base:
                raise ExportError(f"{base_dir}: checkpoint lacks {module}.weight; is it a complete model?")
            if (p.attn_no_op and kind in ATTN) or (p.ffn_no_op and kind in MLP):
                merger.merged.add(module)  # a no-op block: its adapter goes with it
                done |= {k for k in (f"{module}.weight", f"{module}.bias") if k in base}
                continue
            w = merger.weight(module, axis, idx)
            w *= mult[:, None] if axis == 0 else mult[None, :]
            writer.add(f"{module}.weight", merger.cast(w))
            done.add(f"{module}.weight")
            if f"{module}.bias" in base:
                bias = base.get(f"{module}.bias").float()  # o/down biases act after the cut columns: unchanged
                writer.add(f"{module}.bias", merger.cast(bias[idx] * mult if axis == 0 else bias))
                done.add(f"{module}.bias")
        for key in base:  # norms and whatever else the layer holds
            if key.startswith(prefix) and key not in done:
                if key[len(prefix) :].split(".")[0] not in dropped:
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


FORMATS = ("auto", "hf", "nemotron-nas")
DECILM_BASES = ("llama", "mistral", "qwen2")  # Llama-style decoders that the nemotron-nas layout reproduces
DECILM_FILES = (configuration_decilm, modeling_decilm)  # shipped in a nemotron-nas export
# Not Llama fields: the layout has no sliding window (checked), and the rest would only mislead readers.
_DROPPED_KEYS = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")


@dataclass(frozen=True)
class Biases:
    qkv: bool
    o: bool
    mlp: bool


def base_biases(base: BaseWeights, layers: list[tuple[str, dict[str, str]]]) -> Biases:
    mods = layers[0][1]
    has = {kind: f"{mods[kind]}.bias" in base for kind in ("q_proj", "o_proj", "down_proj")}
    return Biases(qkv=has["q_proj"], o=has["o_proj"], mlp=has["down_proj"])


def _base_data(base_config: Any, head_dim: int, dtype: torch.dtype) -> dict[str, Any]:
    data = base_config.to_dict()
    for key in ("architectures", "auto_map", "transformers_version", "model_type", "_name_or_path"):
        data.pop(key, None)
    data.update(head_dim=head_dim, dtype=str(dtype).removeprefix("torch."))
    return data


def stock_config(base_config: Any, served: list[ServedLayer], head_dim: int, dtype: torch.dtype) -> tuple[Any, str]:
    """The base's own config class at the served widths, or None and why it cannot hold them."""
    widths = {(p.num_heads, p.num_kv_heads, p.intermediate_size) for p in served}
    if len(widths) > 1:
        return None, "layers differ in width"
    heads, kv_heads, inter = widths.pop()
    data = _base_data(base_config, head_dim, dtype)
    data.update(num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=inter)
    try:
        cfg = type(base_config)(**data)
    except (ValueError, TypeError, StrictDataclassError) as e:  # LlamaConfig: hidden_size % num_attention_heads
        return None, f"the stock {type(base_config).__name__} rejects these widths ({str(e).splitlines()[-1].strip()})"
    cfg.architectures = base_config.architectures
    return cfg, ""


def decilm_unsupported(run: Run, base: BaseWeights, layers: list[tuple[str, dict[str, str]]]) -> list[str]:
    """Why the base does not fit the nemotron-nas layout (empty: it does)."""
    c, problems = run.base_config, []
    if c.model_type not in DECILM_BASES:
        problems.append(f"model_type {c.model_type!r} is not one of {list(DECILM_BASES)}")
    if getattr(c, "sliding_window", None) is not None and getattr(c, "use_sliding_window", True):
        problems.append(f"sliding_window={c.sliding_window} (the layout has full attention only)")
    for prefix, mods in layers:
        known = {f"{m}.{t}" for m in mods.values() for t in ("weight", "bias")}
        known |= {f"{prefix}input_layernorm.weight", f"{prefix}post_attention_layernorm.weight"}
        extra = sorted(k for k in base if k.startswith(prefix) and k not in known)
        if extra:
            problems.append(f"{extra[:3]} have no place in the layout's decoder layer")
            break
    return problems


def decilm_config(
    base_config: Any, served: list[ServedLayer], head_dim: int, dtype: torch.dtype, biases: Biases
) -> configuration_decilm.DeciLMConfig:
    """The nemotron-nas config of the served layers: exact ``intermediate_size`` per MLP block
    (``ffn_mult`` would be rounded up to a multiple of 256 by vLLM and cannot express every width)."""
    heads = max(p.num_heads for p in served)
    blocks = []
    for p in served:
        attn: dict[str, Any] = {"no_op": p.attn_no_op, "replace_with_linear": False}
        if not p.attn_no_op:
            attn["n_heads_in_group"] = p.num_heads // p.num_kv_heads
        ffn: dict[str, Any] = {"no_op": p.ffn_no_op, "replace_with_linear": False}
        if not p.ffn_no_op:
            ffn["intermediate_size"] = p.intermediate_size
        blocks.append({"attention": attn, "ffn": ffn})
    data = _base_data(base_config, head_dim, dtype)
    for key in _DROPPED_KEYS:
        data.pop(key, None)
    data.update(
        num_attention_heads=heads,
        num_key_value_heads=max(p.num_kv_heads for p in served) or 1,  # an upper bound; blocks say per layer
        intermediate_size=max(p.intermediate_size for p in served) or 1,
        qkv_bias=biases.qkv,
        attention_bias=biases.o,
        mlp_bias=biases.mlp,
        block_configs=blocks,
    )
    cfg = configuration_decilm.DeciLMConfig(**data)
    cfg.architectures = [modeling_decilm.DeciLMForCausalLM.__name__]
    config_module, model_module = (Path(m.__file__).stem for m in DECILM_FILES)
    cfg.auto_map = {
        "AutoConfig": f"{config_module}.{configuration_decilm.DeciLMConfig.__name__}",
        "AutoModelForCausalLM": f"{model_module}.{modeling_decilm.DeciLMForCausalLM.__name__}",
    }
    return cfg


@dataclass
class Layout:
    format: str
    served: list[ServedLayer]
    config: Any
    reason: str  # why the stock architecture was not written ("" when it was)


def choose_layout(
    run: Run, base: BaseWeights, layers: list[tuple[str, dict[str, str]]], plans: list[LayerPlan], fmt: str, dtype
) -> Layout:
    """``hf`` when asked for or (``auto``) when the stock config holds the widths, else nemotron-nas."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: must be one of {', '.join(FORMATS)}")
    d = run.structure.head_dim
    reason = ""
    if fmt in ("auto", "hf"):
        served = serve_hf(plans)
        cfg, reason = stock_config(run.base_config, served, d, dtype)
        if cfg is not None:
            return Layout("hf", served, cfg, "")
        if fmt == "hf":
            raise ExportError(
                f"--format hf: {reason}, so the stock {run.base_config.model_type} architecture cannot hold this run; "
                "use --format nemotron-nas (or auto), or train with pruning.scope=uniform"
            )
    problems = decilm_unsupported(run, base, layers)
    if problems:
        why = f"{reason}, and the nemotron-nas layout does not fit this base: " if reason else "--format nemotron-nas: "
        raise ExportError(why + "; ".join(problems) + "; train with pruning.scope=uniform and use --format hf")
    biases = base_biases(base, layers)
    served = serve_decilm(plans, biases.o, biases.mlp)
    return Layout("nemotron-nas", served, decilm_config(run.base_config, served, d, dtype, biases), reason)


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


def serve_snippet(path: Path, stock: bool) -> str:
    return f"vllm serve {path}" + ("" if stock else " --trust-remote-code")


def model_card(run: Run, result: ExportResult, custom_reason: str, tokenizer: bool = True) -> ModelCard:
    s, summ, cfg = run.structure, run.summary, run.cfg
    source = source_record(run.base_dir, str(cfg.model.path))
    base = base_model_id(run.base_dir, str(cfg.model.path))
    rows = "\n".join(
        f"| {i} | {r.num_heads}/{s.num_heads} | {r.num_kv_heads}/{s.num_kv_heads} | "
        f"{r.intermediate_size}/{s.intermediate_size} | {p.num_heads} | {p.num_kv_heads} | {p.intermediate_size} |"
        for i, (r, p) in enumerate(zip(result.plans, result.served, strict=True))
    )
    removed = result.params_before - result.params_real
    arch = (
        f"stock `{run.base_config.model_type}` architecture"
        if result.stock
        else f"Nemotron-NAS (DeciLM) layout ({custom_reason}): modeling code in "
        + " and ".join(f"`{Path(m.__file__).name}`" for m in DECILM_FILES)
    )
    facts = [
        ("format", f"`{result.format}`"),
        ("criterion / scope", f"{summ.get('criterion')} / {summ.get('scope')}"),
        (
            "target / achieved sparsity (of prunable params)",
            f"{_fmt(summ.get('target_sparsity'))} / {_fmt(summ.get('achieved_sparsity'))}",
        ),
        (
            "parameters before / real after",
            f"{result.params_before:,} / {result.params_real:,} (-{removed:,}, {removed / result.params_before:.1%})",
        ),
        (
            "parameters served (zero padding included) / padding FLOPs per token",
            f"{result.params_after:,} / {result.padding_flops}",
        ),
        ("LoRA", f"r={cfg.lora.r}, alpha={cfg.lora.alpha}, modules {', '.join(cfg.lora.target_modules)}"),
        ("data (train / eval)", f"`{cfg.data.train}` / `{cfg.data.eval}`"),
        ("steps / tokens seen", f"{summ.get('steps')} / {_fmt(summ.get('tokens_seen'), ',')}"),
        (
            "eval perplexity before / after (masked model, training's eval)",
            f"{_fmt(summ.get('eval_ppl_before'))} / {_fmt(summ.get('eval_ppl_after'))}",
        ),
        (
            "dtype (training computed in)",
            f"{str(result.dtype).removeprefix('torch.')} ({summ.get('compute_dtype', '?')})",
        ),
        ("produced by", f"lora-prune-pipeline {__version__} (training: {summ.get('version', '?')})"),
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
Serve it with vLLM:

```bash
{serve_snippet(result.out_dir.resolve(), result.stock)}
```

Per-layer widths (kept / original, then as served: zero heads added where the layout needs them, 0 = no-op block):

| layer | query heads | KV heads | MLP channels | served query heads | served KV heads | served MLP channels |
|---|---|---|---|---|---|---|
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
    fmt: str = "auto",
) -> ExportResult:
    """Write the compact model to ``out_dir`` in ``fmt`` (see FORMATS); ``check`` (e.g. verification)
    runs on the staged directory before it is published, so a failed check publishes nothing."""
    if merge_into not in ("original", "dequantized"):
        raise ExportError(f"--merge-into {merge_into}: must be original or dequantized")
    out_dir = Path(out_dir)
    base = BaseWeights(run.base_dir)
    dtype = dtype or _base_dtype(base)
    plans = plan(run)
    layers, quantized = module_names(run.base_config)
    layout = choose_layout(run, base, layers, plans, fmt, dtype)
    notes = list(run.notes)
    if merge_into == "dequantized" and run.cfg.model.quantization == "none":
        notes.append("the run's base was not quantized: dequantized and original are the same merge")
    if merge_into == "dequantized" and run.cfg.model.dtype == "auto" and "compute_dtype" not in run.summary:
        notes.append(f"model.dtype=auto: NF4 quantization replayed in {run.train_dtype} (as on this machine)")
    padded = sum(p.padding for p in plans)
    if padded:
        notes.append(f"{padded} pruned head(s) kept at mask 0 so every kept KV head has the same query heads")
    biases = base_biases(base, layers)
    pad = padding_params(layout.served, run.structure, biases.qkv, biases.mlp)
    zero_q = sum(p.padding[0] for p in layout.served)
    with staged_output(out_dir, overwrite, [run.dir, run.base_dir]) as tmp:
        merger = _Merger(run, base, merge_into, dtype, quantized)
        writer = ShardWriter(tmp, max_shard_bytes)
        _write_weights(run, layers, layout.served, merger, writer)
        writer.close()
        layout.config.save_pretrained(tmp)
        if layout.format == "nemotron-nas":
            for module in DECILM_FILES:
                shutil.copyfile(module.__file__, tmp / Path(module.__file__).name)
            notes.append(
                f"{layout.reason or '--format nemotron-nas'}: wrote the Nemotron-NAS (DeciLM) layout; load with "
                "trust_remote_code=True (vLLM: --trust-remote-code)"
            )
        if (run.base_dir / "generation_config.json").is_file():
            shutil.copyfile(run.base_dir / "generation_config.json", tmp / "generation_config.json")
        tokenizer = True
        try:
            AutoTokenizer.from_pretrained(run.base_dir).save_pretrained(tmp)
        except (OSError, ValueError) as e:
            tokenizer = False
            notes.append(f"no tokenizer written ({e}); copy it from {run.base_dir}")
        result = ExportResult(
            out_dir,
            layout.format,
            base.numel(),
            writer.numel,
            plans,
            layout.served,
            dtype,
            merge_into,
            padding_params=pad,
            zero_query_heads=zero_q,
            head_dim=run.structure.head_dim,
            notes=notes,
        )
        model_card(run, result, layout.reason, tokenizer).save(tmp / "README.md")
        for note in notes:
            log(f"note: {note}")
        if check is not None:
            check(tmp, result)
    return result
