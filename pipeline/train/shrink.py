"""Shrink in flight (``pruning.shrink``): cut the pruned heads and channels out of the model being trained.

At a shrink (the final mask decision, or every one), every rank gathers the ZeRO-3 state (the frozen base,
the LoRA factors, their fp32 masters and AdamW moments), drops the engine, cuts each decoder layer to the
units its masks keep and starts a new engine on the smaller model, whose optimizer then continues from
the sliced state (same step count, learning rate and schedule). Masks, scores and decisions keep speaking
in original unit indices: ``Masks.kept`` maps a shrunk layer's units back to them.

Quantization. Row-sliced projections (q, k, v, gate, up) keep their NF4 codes exactly (a row is a whole
number of 64-value blocks); their absmax statistics are kept un-nested (fp32), since re-nesting a subset
would re-quantize them. Column-sliced ones (o_proj, down_proj) cut across blocks: ``pruning.shrink_columns``
keeps the kept columns dense in the compute dtype (``dense``, the default: exact, 4x the bytes of NF4 in bf16
for those two projections) or quantizes them to NF4 again (``requantize``: the memory of NF4, +0.06% to
+0.9% held-out perplexity measured, see docs/BENCHMARKS.md).

Which units a layer keeps comes from ``layer_plan.plan_layer``, as in export, so training and export agree,
including the masked padding heads that uneven KV groups need (they stay in the model at mask 0). The history of
shrinks (step and kept original indices per layer) is saved in checkpoints and in the run directory
(``shrink.safetensors``): resume and ``--verify`` replay it on a freshly loaded base, and compact replays
the column re-quantization, so the export is the model that was trained.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.dist import comm as D
from pipeline.model.loading import NF4_BLOCKSIZE, nf4_roundtrip
from pipeline.model.structure import Structure, decoder_layers, layer_modules
from pipeline.pruning.layer_plan import LayerPlan, plan_layer, unit_rows

# Which axis of the base weight [out, in] a projection loses when units are cut.
ROW_SLICED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
COL_SLICED = ("o_proj", "down_proj")
_PREFIX = "shrink."
Cuts = dict[str, tuple[str, torch.Tensor]]  # trainable parameter name -> (module kind, kept indices)


@dataclass(frozen=True)
class LayerKeep:
    """Indices into the original projections that one layer keeps after a shrink.

    ``plan.q_heads`` may include masked padding heads (uneven KV groups under global scope): they stay in the
    model at mask 0, so the masks keep speaking in original unit indices through these maps.
    """

    plan: LayerPlan
    head_dim: int

    def units(self, module: str) -> torch.Tensor:
        """Original unit indices of ``module``'s units: query heads (q, o), KV heads (k, v) or channels."""
        if module in ("q_proj", "o_proj"):
            return self.plan.q_heads
        if module in ("k_proj", "v_proj"):
            return self.plan.kv_heads
        if module in ("gate_proj", "up_proj", "down_proj"):
            return self.plan.channels
        raise ValueError(f"shrink: {module} is not a prunable projection (one of {ROW_SLICED + COL_SLICED})")

    def rows(self, module: str) -> torch.Tensor:
        """Kept output rows (row-sliced modules) or input columns (column-sliced) of ``module``."""
        size = self.head_dim if module in ("q_proj", "o_proj", "k_proj", "v_proj") else 1
        return unit_rows(self.units(module), size)

    @property
    def kv_groups(self) -> int:
        """Query heads per KV head in the shrunk layer (attention's num_key_value_groups)."""
        return len(self.plan.q_heads) // max(len(self.plan.kv_heads), 1)


def layer_keep(
    heads: torch.Tensor, channels: torch.Tensor, heads_per_group: int, head_dim: int, present: LayerKeep | None = None
) -> LayerKeep:
    pq = None if present is None else set(present.plan.q_heads.tolist())
    return LayerKeep(plan_layer(heads, channels, heads_per_group, pq), head_dim)


def plan_keeps(
    s: Structure, heads: torch.Tensor, channels: torch.Tensor, present: list[LayerKeep] | None
) -> list[LayerKeep]:
    """What every layer keeps under the masks, padding only with heads the (shrunk) model still holds."""
    h, c = heads.detach().cpu(), channels.detach().cpu()
    return [
        layer_keep(h[i], c[i], s.heads_per_group, s.head_dim, None if present is None else present[i])
        for i in range(s.num_layers)
    ]


def relative(new: torch.Tensor, old: torch.Tensor | None) -> torch.Tensor:
    """Positions of the original indices ``new`` among the ones a shrunk tensor holds (``old``; None: all)."""
    if old is None:
        return new
    pos = {int(u): i for i, u in enumerate(old.tolist())}
    missing = [int(u) for u in new.tolist() if int(u) not in pos]
    if missing:
        raise RuntimeError(f"shrink: units {missing[:5]} were removed earlier and cannot come back")
    return torch.tensor([pos[int(u)] for u in new.tolist()], dtype=torch.long)


@dataclass
class ShrinkHistory:
    """The shrinks of a run, in order: (step, what every layer keeps, in original indices)."""

    events: list[tuple[int, list[LayerKeep]]] = field(default_factory=list)

    @property
    def current(self) -> list[LayerKeep] | None:
        return self.events[-1][1] if self.events else None

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for e, (step, keeps) in enumerate(self.events):
            out[f"{_PREFIX}{e}.step"] = torch.tensor([step], dtype=torch.int64)
            for i, k in enumerate(keeps):
                out[f"{_PREFIX}{e}.{i}.q"] = k.plan.q_heads
                out[f"{_PREFIX}{e}.{i}.kv"] = k.plan.kv_heads
                out[f"{_PREFIX}{e}.{i}.ch"] = k.plan.channels
                out[f"{_PREFIX}{e}.{i}.hs"] = k.plan.head_scale
                out[f"{_PREFIX}{e}.{i}.cs"] = k.plan.channel_scale
                out[f"{_PREFIX}{e}.{i}.pad"] = torch.tensor([k.plan.padding], dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], s: Structure) -> ShrinkHistory:
        events = []
        e = 0
        while f"{_PREFIX}{e}.step" in t:
            keeps = [LayerKeep(_plan(t, f"{_PREFIX}{e}.{i}."), s.head_dim) for i in range(s.num_layers)]
            events.append((int(t[f"{_PREFIX}{e}.step"]), keeps))
            e += 1
        return cls(events)

    def save(self, path: Path) -> None:
        save_file({k: v.contiguous() for k, v in self.tensors().items()}, str(path))

    @classmethod
    def load(cls, path: Path, s: Structure) -> ShrinkHistory:
        return cls.from_tensors(load_file(str(path)), s) if path.is_file() else cls()

    def steps(self) -> list[int]:
        return [step for step, _ in self.events]

    def column_cuts(self, layer: int, module: str) -> list[torch.Tensor]:
        """The column index sets a column-sliced projection was cut to, each relative to the one before."""
        cuts, old = [], None
        for _, keeps in self.events:
            new = keeps[layer].rows(module)
            cuts.append(relative(new, old))
            old = new
        return cuts

    def expand_lora(self, key: str, t: torch.Tensor, s: Structure) -> torch.Tensor:
        """A saved LoRA factor of the shrunk model at its original shape (zeros for removed units), so the
        adapter loads onto the base it was trained from; other tensors pass through."""
        keeps = self.current
        if keeps is None:
            return t
        parts = key.split(".")
        if "layers" not in parts or not any(p in ROW_SLICED + COL_SLICED for p in parts):
            return t
        layer = int(parts[parts.index("layers") + 1])
        module = next(p for p in parts if p in ROW_SLICED + COL_SLICED)
        axis = lora_axis(module, _factor(key))
        if axis is None:
            return t
        shape = list(t.shape)
        shape[axis] = _full_dim(module, s)
        return t.new_zeros(shape).index_copy_(axis, keeps[layer].rows(module), t)


def _plan(t: dict[str, torch.Tensor], key: str) -> LayerPlan:
    return LayerPlan(
        t[key + "q"].long(),
        t[key + "kv"].long(),
        t[key + "ch"].long(),
        t[key + "hs"],
        t[key + "cs"],
        int(t[key + "pad"]),
    )


def _full_dim(module: str, s: Structure) -> int:
    if module in ("q_proj", "o_proj"):
        return s.num_heads * s.head_dim
    if module in ("k_proj", "v_proj"):
        return s.num_kv_heads * s.head_dim
    return s.intermediate_size


# ------------------------------------------------------------------------------------- tensor-level cuts


def lora_axis(module: str, factor: str) -> int | None:
    """The axis of LoRA factor ``factor`` (``A`` [r, in] or ``B`` [out, r]) that a cut of ``module`` slices:
    B's rows of a row-sliced projection, A's columns of a column-sliced one; None: the factor is not cut.
    Its fp32 master and AdamW moments have its shape and are cut alike (elementwise optimizer state, so
    slicing commutes with the update)."""
    if module in ROW_SLICED:
        return 0 if factor == "B" else None
    if module in COL_SLICED:
        return 1 if factor == "A" else None
    raise ValueError(f"shrink: {module} is not a prunable projection")


def _factor(key: str) -> str:
    """``A`` or ``B`` from a LoRA parameter name (PEFT's ``...lora_A.default.weight``)."""
    return "A" if ".lora_A." in key else "B"


def slice_lora(module: str, a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut one LoRA pair (A [r, in], B [out, r]) to the units ``idx`` of ``module``."""
    cut = [
        t.clone() if (ax := lora_axis(module, f)) is None else t.index_select(ax, idx) for f, t in (("A", a), ("B", b))
    ]
    return cut[0], cut[1]


def _absmax_fp32(state: bnb.functional.QuantState) -> torch.Tensor:
    if not state.nested:
        return state.absmax.float()
    return bnb.functional.dequantize_blockwise(state.absmax, state.state2).float() + state.offset


def slice_nf4_rows(
    packed: torch.Tensor, state: bnb.functional.QuantState, idx: torch.Tensor
) -> tuple[torch.Tensor, bnb.functional.QuantState]:
    """Keep rows ``idx`` of an NF4 weight [out, in] without re-quantizing: exact when in % blocksize == 0.
    ``packed`` may be stored as any dtype (``bnb_4bit_quant_storage``); the result keeps it."""
    out_f, in_f = state.shape
    if in_f % state.blocksize or in_f % 2:
        raise ValueError(
            f"shrink: an NF4 row of {in_f} values is not a whole number of {state.blocksize}-value blocks; "
            "use slice_nf4_cols-style re-quantization for this projection"
        )
    codes = packed.contiguous().view(torch.uint8).view(out_f, in_f // 2)
    rows = codes.index_select(0, idx.to(codes.device)).contiguous().view(packed.dtype).reshape(-1, 1)
    absmax = _absmax_fp32(state).view(out_f, in_f // state.blocksize).index_select(0, idx.to(codes.device))
    new = bnb.functional.QuantState(
        absmax=absmax.flatten().contiguous(),
        shape=torch.Size((len(idx), in_f)),
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.dtype,
    )
    return rows, new


def slice_nf4_cols(
    packed: torch.Tensor, state: bnb.functional.QuantState, idx: torch.Tensor, mode: str
) -> tuple[torch.Tensor, bnb.functional.QuantState | None]:
    """Keep columns ``idx`` of an NF4 weight: ``requantize`` (NF4 again, approximate) or ``dense`` (the
    dequantized slice in the compute dtype, exact; the state is None)."""
    w = bnb.functional.dequantize_4bit(packed, state).index_select(1, idx.to(packed.device)).contiguous()
    if mode == "dense" or not len(idx):  # no columns left: an empty dense weight (bnb's 4-bit matmul needs some)
        return w, None
    if mode != "requantize":
        raise ValueError(f"shrink: column mode {mode!r}: use requantize or dense")
    return requantize(w, state.nested, packed.dtype)


def replay_columns(w: torch.Tensor, cuts: list[torch.Tensor], dtype: torch.dtype, double_quant: bool) -> torch.Tensor:
    """The weight a column-sliced NF4 projection trained against after its re-quantizing shrinks (``w``: the
    NF4 round trip of the original), at the original shape with zeros in the removed columns (export)."""
    full = w.new_zeros(w.shape)
    cols = torch.arange(w.shape[1])
    for rel in cuts:  # each shrink re-quantized the kept columns of what the one before left
        w = nf4_roundtrip(w[:, rel], dtype, double_quant)
        cols = cols[rel]
    full[:, cols] = w.to(full.dtype)
    return full


def requantize(w: torch.Tensor, nested: bool, storage: torch.dtype) -> tuple[torch.Tensor, bnb.functional.QuantState]:
    """NF4 of a dense slice as transformers' 4-bit loader quantizes a weight (export replays this)."""
    return bnb.functional.quantize_4bit(
        w, blocksize=NF4_BLOCKSIZE, compress_statistics=nested, quant_type="nf4", quant_storage=storage
    )


@torch.no_grad()
def shrink_projection(module: nn.Module, name: str, idx: torch.Tensor, col_mode: str = "dense") -> nn.Module:
    """Cut one projection in place (no ZeRO-3 partitioning): a PEFT LoRA layer or a plain Linear, NF4 or
    not. Returns the module to hold in the parent: itself, or a plain Linear that replaced an un-adapted
    NF4 layer whose columns were kept dense."""
    base = getattr(module, "base_layer", module)
    w = base.weight
    axis = 0 if name in ROW_SLICED else 1
    if isinstance(w, bnb.nn.Params4bit):
        if axis == 0:
            packed, state = slice_nf4_rows(w.data, w.quant_state, idx)
        else:
            packed, state = slice_nf4_cols(w.data, w.quant_state, idx, col_mode)
        if state is None:  # dense: the projection becomes a plain frozen weight in the compute dtype
            new_w = nn.Parameter(packed.to(w.quant_state.dtype), requires_grad=False)
            with torch.device("meta"):  # no throwaway init: the weight is set right after
                dense = nn.Linear(packed.shape[1], packed.shape[0], bias=base.bias is not None, dtype=new_w.dtype)
            dense.weight = new_w
            dense.bias = base.bias
            if base is module:
                module = base = dense
            else:
                module.base_layer = base = dense
        else:
            base.weight = bnb.nn.Params4bit(
                packed,
                requires_grad=False,
                quant_state=state,
                quant_type="nf4",
                blocksize=state.blocksize,
                bnb_quantized=True,
                module=base,
            )
    else:
        base.weight = nn.Parameter(w.index_select(axis, idx.to(w.device)).contiguous(), requires_grad=w.requires_grad)
    if axis == 0 and base.bias is not None:
        base.bias = nn.Parameter(base.bias.index_select(0, idx.to(base.bias.device)).contiguous(), requires_grad=False)
    qs = getattr(base.weight, "quant_state", None)
    base.out_features, base.in_features = tuple(base.weight.shape if qs is None else qs.shape)
    for key in getattr(module, "lora_A", {}):
        la, lb = module.lora_A[key], module.lora_B[key]
        a, b = slice_lora(name, la.weight, lb.weight, idx.to(la.weight.device))
        la.weight = nn.Parameter(a, requires_grad=la.weight.requires_grad)
        lb.weight = nn.Parameter(b, requires_grad=lb.weight.requires_grad)
        la.in_features, lb.out_features = a.shape[1], b.shape[0]
    if hasattr(module, "in_features") and module is not base:
        module.in_features, module.out_features = base.in_features, base.out_features
    return module


def cut_layer(layer: nn.Module, new: LayerKeep, old: LayerKeep | None, col_mode: str) -> None:
    """Cut one decoder layer (plain tensors, no ZeRO-3) from what it holds (``old``; None: the original)
    to ``new``, and set the per-layer attention width."""
    mods = layer_modules(layer)
    for name, mod in mods.items():
        idx = relative(new.rows(name), None if old is None else old.rows(name))
        cut = shrink_projection(mod, name, idx, col_mode)
        if cut is not mod:
            setattr(layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp, name, cut)
    layer.self_attn.num_key_value_groups = new.kv_groups


def apply_history(model: nn.Module, history: ShrinkHistory, col_mode: str) -> None:
    """Replay a run's shrinks on a freshly loaded (PEFT) model with plain tensors: resume and --verify."""
    old: list[LayerKeep] | None = None
    for _, keeps in history.events:
        for i, layer in enumerate(decoder_layers(model)):
            cut_layer(layer, keeps[i], None if old is None else old[i], col_mode)
        old = keeps


# --------------------------------------------------------------------------------- the ZeRO-3 rebuild


def _is_zero(p: nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def _plain_copy(p: nn.Parameter, module: nn.Module) -> nn.Parameter:
    """A full, unpartitioned copy of a (gathered) parameter, of the same kind (NF4 keeps its quant state)."""
    data = p.data.detach().clone()
    if isinstance(p, bnb.nn.Params4bit):
        return bnb.nn.Params4bit(
            data,
            requires_grad=False,
            quant_state=p.quant_state,
            quant_type=p.quant_type,
            blocksize=p.blocksize,
            bnb_quantized=True,
            module=module,
        )
    return nn.Parameter(data, requires_grad=p.requires_grad)


def gather_plain(model: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """Full copies of every ZeRO-3 parameter, module by module (collectives in module order, on every
    rank); the peak is one full copy of the model per rank, as while loading a quantized base."""
    copies, done = [], {}  # a parameter shared by modules (tied embeddings) is copied once and stays shared
    for module in model.modules():
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if _is_zero(p)]
        todo = [p for _, p in own if id(p) not in done]
        if todo:
            with D.gathered(todo):
                done.update({id(p): _plain_copy(p, module) for p in todo})
        copies += [(module, n, done[id(p)]) for n, p in own]
    return copies


def rebind(copies: list[tuple[nn.Module, str, nn.Parameter]]) -> None:
    """Put the plain copies in place of the ZeRO-3 parameters (after the engine's hooks are gone)."""
    for module, name, p in copies:
        module._parameters[name] = p


# Module attributes DeepSpeed's ZeRO-3 hooks keep besides the ds_* ones (deepspeed/runtime/zero): a stale
# pre-backward reference count keeps the next engine from releasing parameters after backward.
_ZERO_MODULE_STATE = (
    "_external_params",
    "_original_parameters",
    "all_parameters",
    "applied_pre_backward_ref_cnt",
    "pre_bwd_fn",
    "post_bwd_fn",
)


def forget_zero(model: nn.Module) -> None:
    """Drop what ZeRO-3 left on the modules of a destroyed engine (ids, external-parameter registries, the
    auto-gathering parameter dict), so that the next engine registers the model afresh: a stale registry
    makes the new engine fetch a LoRA factor for its wrapper as well and never release it."""
    for module in model.modules():
        module._parameters = dict(module._parameters)
        for attr in [a for a in vars(module) if a.startswith("ds_") or a in _ZERO_MODULE_STATE]:
            delattr(module, attr)


def materialize(model: nn.Module) -> None:
    """Plain full parameters in place of ZeRO-3 ones that no engine drives (a full-precision base that
    ``zero.Init`` partitioned while loading), so that the model can be cut (collective)."""
    if any(_is_zero(p) for p in model.parameters()):
        rebind(gather_plain(model))
        forget_zero(model)


@dataclass
class OptimizerState:
    """The trainable parameters' fp32 masters and elementwise optimizer state as full tensors, plus what
    continues the schedule: scalar state (Adam's step), the param groups' lr/step and engine counters."""

    fp32: dict[str, torch.Tensor]
    moments: dict[str, dict[str, torch.Tensor]]
    scalar_state: dict[str, Any]
    groups: list[dict[str, Any]]
    scheduler: dict[str, Any] | None
    counters: dict[str, int]

    @classmethod
    def capture(cls, engine: Any, named: list[tuple[str, nn.Parameter]]) -> OptimizerState:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        zopt = engine.optimizer
        inner = getattr(zopt, "optimizer", zopt)
        flat = getattr(zopt, "fp32_partitioned_groups_flat", [])
        first = inner.state.get(flat[0], {}) if flat else {}
        per_elem = [k for k, v in first.items() if torch.is_tensor(v) and v.numel() == flat[0].numel() and v.dim()]
        scalar = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in first.items() if k not in per_elem}
        fp32, moments = {}, {}
        for name, p in named:  # collectives, same order on every rank
            shape = tuple(getattr(p, "ds_shape", p.shape))
            fp32[name] = safe_get_full_fp32_param(p).detach().clone().view(shape)
            moments[name] = {k: safe_get_full_optimizer_state(p, k).detach().clone().view(shape) for k in per_elem}
        groups = [{k: v for k, v in g.items() if k in ("lr", "step")} for g in inner.param_groups]
        sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
        counters = {k: getattr(engine, k) for k in ("global_steps", "global_samples", "micro_steps", "skipped_steps")}
        return cls(fp32, moments, scalar, groups, sched, counters)

    def slice(self, name: str, t: torch.Tensor, cuts: Cuts) -> torch.Tensor:
        """``t`` (a factor's shape) cut like its parameter (``cuts``: param name -> (module kind, idx))."""
        if name not in cuts:
            return t
        module, idx = cuts[name]
        axis = lora_axis(module, _factor(name))
        return t if axis is None else t.index_select(axis, idx.to(t.device))

    def restore(self, engine: Any, named: list[tuple[str, nn.Parameter]], cuts: Cuts) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        zopt = engine.optimizer
        inner = getattr(zopt, "optimizer", zopt)
        keys = next(iter(self.moments.values()), {}).keys()
        for flat in getattr(zopt, "fp32_partitioned_groups_flat", []):  # lazily created state, made now
            st = inner.state[flat]
            for k in keys:
                st[k] = torch.zeros_like(flat)
            for k, v in self.scalar_state.items():
                st[k] = v.clone() if torch.is_tensor(v) else v
        for g, saved in zip(inner.param_groups, self.groups, strict=True):
            g.update(saved)
        for name, p in named:
            safe_set_full_fp32_param(p, self.slice(name, self.fp32[name], cuts))
            for k in keys:
                safe_set_full_optimizer_state(p, self.slice(name, self.moments[name][k], cuts), k)
        if self.scheduler is not None and engine.lr_scheduler is not None:
            engine.lr_scheduler.load_state_dict(self.scheduler)
        for k, v in self.counters.items():
            setattr(engine, k, v)


def release(engine: Any, params: list[nn.Parameter]) -> None:
    """Free what a destroyed engine holds: DeepSpeed keeps references to its parameters and optimizer in
    closures beyond ``destroy()``, so the partitions (the old base) and the optimizer state would outlive it."""
    for p in params:
        p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        for attr in [a for a in vars(p) if a.startswith("ds_") or a == "_z3_optimizer"]:
            delattr(p, attr)
    zopt = getattr(engine, "optimizer", None)
    inner = getattr(zopt, "optimizer", None)
    if inner is not None and hasattr(inner, "state"):
        inner.state.clear()
    for attr in ("fp32_partitioned_groups_flat", "fp16_partitioned_groups_flat", "fp16_groups", "averaged_gradients"):
        if isinstance(getattr(zopt, attr, None), (list, dict)):
            setattr(zopt, attr, type(getattr(zopt, attr))())
    for attr in ("grad_partitions_flat_buffer", "ipg_buckets", "lp_param_buffer"):
        if hasattr(zopt, attr):
            setattr(zopt, attr, None)


def lora_cuts(model: nn.Module, new: list[LayerKeep], old: list[LayerKeep] | None) -> Cuts:
    """Trainable parameter name -> (module kind, kept indices relative to what it holds now)."""
    cuts = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, mod in layer_modules(layer).items():
            idx = relative(new[i].rows(name), None if old is None else old[i].rows(name))
            for p in mod.parameters():
                if p.requires_grad:
                    cuts[id(p)] = (name, idx)
    return {n: cuts[id(p)] for n, p in model.named_parameters() if id(p) in cuts}


def shrink_engine(
    engine: Any,
    model: nn.Module,
    new: list[LayerKeep],
    old: list[LayerKeep] | None,
    col_mode: str,
    initialize: Callable[[nn.Module], Any],
) -> Any:
    """Cut ``model`` (inside ``engine``) to ``new`` and return the engine ``initialize`` builds on the cut
    model, with the optimizer continuing from the sliced state. Collective: every rank, the same ``new``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    cuts = lora_cuts(model, new, old)
    state = OptimizerState.capture(engine, named)
    copies = gather_plain(model)
    old_params = list(model.parameters())
    engine.destroy()
    # destroy() leaves the engine's own forward hooks on the model: they would run the old engine's
    # prologue on every forward and keep it (and its partitions) alive.
    for attr in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
        handle = getattr(engine, attr, None)
        if handle is not None:
            handle.remove()
    rebind(copies)
    del copies
    forget_zero(model)
    release(engine, old_params)
    del old_params
    for i, layer in enumerate(decoder_layers(model)):
        cut_layer(layer, new[i], None if old is None else old[i], col_mode)
    for n, p in model.named_parameters():  # the working copy from the exact fp32 masters (ZeRO-3 casts it)
        if n in state.fp32:
            p.data = state.slice(n, state.fp32[n], cuts).to(p.dtype, copy=True).view(p.shape)
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    new_engine = initialize(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    state.restore(new_engine, named, cuts)
    return new_engine
