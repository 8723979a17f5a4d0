"""Shrink in flight (issue 14): the tensor-level cuts that remove pruned heads and channels from a layer.

What exists: which original units a layer keeps (``plan_layer`` from export, so training and export agree,
including the masked padding heads that uneven KV groups need), the LoRA factor / fp32 master / AdamW
moment slicing, and the NF4 base slicing. Row-sliced projections (q, k, v, gate, up) keep their NF4 codes
exactly when a row is a whole number of blocks; the absmax statistics are kept un-nested (fp32) because
re-nesting a subset would re-quantize them and change the weights. Column-sliced projections (o_proj,
down_proj) cannot keep their blocks: ``slice_nf4_cols`` either re-quantizes the slice (``requantize``) or
keeps it dense in the compute dtype (``dense``, exact, 4x the bytes of NF4 for those two projections).

``shrink_projection`` applies the cuts in place to one (PEFT LoRA) projection outside ZeRO-3.

What does not exist yet: per-layer attention attributes (num_key_value_groups) and kept-space masks on a
whole model, rebuilding the ZeRO-3 engine mid-run with the cut state (the config refuses
``pruning.shrink`` other than off until it does; pipeline/config/schema.py ``validate_shrink``).
"""

from __future__ import annotations

from dataclasses import dataclass

import bitsandbytes as bnb
import torch

from pipeline.export.compact import NF4_BLOCKSIZE, LayerPlan, _rows, plan_layer

# Which axis of the base weight [out, in] a projection loses when units are cut.
ROW_SLICED = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
COL_SLICED = ("o_proj", "down_proj")


@dataclass(frozen=True)
class LayerKeep:
    """Indices into the original projections that one layer keeps after a shrink.

    ``plan.q_heads`` may include masked padding heads (uneven KV groups under global scope): they stay in the
    model at mask 0, so the masks keep speaking in original unit indices through these maps.
    """

    plan: LayerPlan
    head_dim: int

    def rows(self, module: str) -> torch.Tensor:
        """Kept output rows (row-sliced modules) or input columns (column-sliced) of ``module``."""
        if module in ("q_proj", "o_proj"):
            return _rows(self.plan.q_heads, self.head_dim)
        if module in ("k_proj", "v_proj"):
            return _rows(self.plan.kv_heads, self.head_dim)
        if module in ("gate_proj", "up_proj", "down_proj"):
            return self.plan.channels
        raise ValueError(f"shrink: {module} is not a prunable projection (one of {ROW_SLICED + COL_SLICED})")


def layer_keep(heads: torch.Tensor, channels: torch.Tensor, heads_per_group: int, head_dim: int) -> LayerKeep:
    return LayerKeep(plan_layer(heads, channels, heads_per_group), head_dim)


def slice_lora(module: str, a: torch.Tensor, b: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut one LoRA pair (A [r, in], B [out, r]); the same call slices its fp32 masters and AdamW moments,
    which have the factors' shapes (elementwise optimizer state, so slicing commutes with the update)."""
    if module in ROW_SLICED:
        return a.clone(), b.index_select(0, idx)
    if module in COL_SLICED:
        return a.index_select(1, idx), b.clone()
    raise ValueError(f"shrink: {module} is not a prunable projection")


def _absmax_fp32(state: bnb.functional.QuantState) -> torch.Tensor:
    if not state.nested:
        return state.absmax.float()
    return bnb.functional.dequantize_blockwise(state.absmax, state.state2).float() + state.offset


def slice_nf4_rows(
    packed: torch.Tensor, state: bnb.functional.QuantState, idx: torch.Tensor
) -> tuple[torch.Tensor, bnb.functional.QuantState]:
    """Keep rows ``idx`` of an NF4 weight [out, in] without re-quantizing: exact when in % blocksize == 0."""
    out_f, in_f = state.shape
    if in_f % state.blocksize or in_f % 2:
        raise ValueError(
            f"shrink: an NF4 row of {in_f} values is not a whole number of {state.blocksize}-value blocks; "
            "use slice_nf4_cols-style re-quantization for this projection"
        )
    rows = packed.view(out_f, in_f // 2).index_select(0, idx).reshape(-1, 1).contiguous()
    absmax = _absmax_fp32(state).view(out_f, in_f // state.blocksize).index_select(0, idx).flatten().contiguous()
    new = bnb.functional.QuantState(
        absmax=absmax,
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
    w = bnb.functional.dequantize_4bit(packed, state).index_select(1, idx).contiguous()
    if mode == "dense":
        return w, None
    if mode != "requantize":
        raise ValueError(f"shrink: column mode {mode!r}: use requantize or dense")
    return bnb.functional.quantize_4bit(
        w, blocksize=NF4_BLOCKSIZE, compress_statistics=state.nested, quant_type="nf4", quant_storage=packed.dtype
    )


@torch.no_grad()
def shrink_projection(module: torch.nn.Module, name: str, idx: torch.Tensor, col_mode: str = "dense") -> None:
    """Cut one projection in place (no ZeRO-3 partitioning): a PEFT LoRA layer or a plain Linear, NF4 or not."""
    base = getattr(module, "base_layer", module)
    w = base.weight
    axis = 0 if name in ROW_SLICED else 1
    if isinstance(w, bnb.nn.Params4bit):
        if axis == 0:
            packed, state = slice_nf4_rows(w.data, w.quant_state, idx)
        else:
            packed, state = slice_nf4_cols(w.data, w.quant_state, idx, col_mode)
        if state is None:  # dense: the projection becomes a plain frozen weight in the compute dtype
            new_w: torch.nn.Parameter = torch.nn.Parameter(packed.to(w.quant_state.dtype), requires_grad=False)
            dense = torch.nn.Linear(packed.shape[1], packed.shape[0], bias=base.bias is not None, dtype=new_w.dtype)
            dense.weight = new_w
            dense.bias = base.bias
            if base is module:
                raise ValueError(f"shrink: {name} dense column mode needs a PEFT-wrapped layer to swap the base")
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
        base.weight = torch.nn.Parameter(w.index_select(axis, idx).contiguous(), requires_grad=w.requires_grad)
    if axis == 0 and base.bias is not None:
        base.bias = torch.nn.Parameter(base.bias.index_select(0, idx).contiguous(), requires_grad=False)
    qs = getattr(base.weight, "quant_state", None)
    base.out_features, base.in_features = tuple(base.weight.shape if qs is None else qs.shape)
    for key in getattr(module, "lora_A", {}):
        la, lb = module.lora_A[key], module.lora_B[key]
        a, b = slice_lora(name, la.weight, lb.weight, idx)
        la.weight = torch.nn.Parameter(a, requires_grad=la.weight.requires_grad)
        lb.weight = torch.nn.Parameter(b, requires_grad=lb.weight.requires_grad)
        la.in_features, lb.out_features = a.shape[1], b.shape[0]
    if hasattr(module, "in_features"):
        module.in_features, module.out_features = base.in_features, base.out_features
