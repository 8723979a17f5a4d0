"""Shrink in flight (issue 14): the tensor-level cuts that remove pruned heads and channels from a layer.

What exists: which original units a layer keeps (``plan_layer`` from export, so training and export agree,
including the masked padding heads that uneven KV groups need), the LoRA factor / fp32 master / AdamW
moment slicing, and the NF4 base slicing. Row-sliced projections (q, k, v, gate, up) keep their NF4 codes
exactly when a row is a whole number of blocks; the absmax statistics are kept un-nested (fp32) because
re-nesting a subset would re-quantize them and change the weights. Column-sliced projections (o_proj,
down_proj) cannot keep their blocks: ``slice_nf4_cols`` either re-quantizes the slice (``requantize``) or
keeps it dense in the compute dtype (``dense``, exact, 4x the bytes of NF4 for those two projections).

What does not exist yet: rebuilding the ZeRO-3 engine mid-run with the cut state (the config refuses
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
