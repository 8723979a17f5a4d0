"""Shrink in flight: the cut layer computes what the masked layer computed (pipeline/train/shrink.py)."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model

from pipeline.train.shrink import layer_keep, shrink_projection, slice_lora, slice_nf4_cols, slice_nf4_rows


def _nf4(out_f: int, in_f: int, nested: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    return bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")


@pytest.mark.parametrize("nested", [False, True])
def test_row_slice_keeps_nf4_codes_exactly(nested: bool) -> None:
    packed, state = _nf4(32, 128, nested)
    idx = torch.tensor([0, 3, 4, 17, 31])
    rows, new = slice_nf4_rows(packed, state, idx)
    full = bnb.functional.dequantize_4bit(packed, state)
    assert torch.equal(bnb.functional.dequantize_4bit(rows, new), full[idx])
    assert rows.numel() * 2 == len(idx) * 128


def test_row_slice_refuses_partial_blocks() -> None:
    packed, state = _nf4(4, 96, False)
    with pytest.raises(ValueError, match="whole number of 64-value blocks"):
        slice_nf4_rows(packed, state, torch.tensor([1]))


def test_column_slice_dense_exact_requantize_close() -> None:
    packed, state = _nf4(64, 256, True)
    idx = torch.arange(0, 256, 2)
    ref = bnb.functional.dequantize_4bit(packed, state)[:, idx]
    dense, none = slice_nf4_cols(packed, state, idx, "dense")
    assert none is None and torch.equal(dense, ref)
    q, qs = slice_nf4_cols(packed, state, idx, "requantize")
    err = (bnb.functional.dequantize_4bit(q, qs) - ref).norm() / ref.norm()
    # Re-quantizing an NF4 weight on new block boundaries: a few percent, not zero.
    assert 0 < err < 0.15


def test_uneven_groups_keep_masked_padding_heads() -> None:
    heads = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])  # 2 KV groups of 4: 2 and 1 kept
    keep = layer_keep(heads, torch.tensor([1.0, 0.0, 1.0]), heads_per_group=4, head_dim=2)
    assert keep.plan.q_heads.tolist() == [0, 1, 4, 5] and keep.plan.padding == 1
    assert keep.plan.head_scale.tolist() == [1.0, 1.0, 1.0, 0.0]
    assert keep.rows("k_proj").tolist() == [0, 1, 2, 3]
    assert keep.rows("o_proj").tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    assert keep.rows("down_proj").tolist() == [0, 2]


def test_cut_lora_layer_equals_masked_layer() -> None:
    """up (row-sliced) then down (column-sliced) with LoRA: cut == masked, exactly in fp32 algebra."""
    g = torch.Generator().manual_seed(1)
    hidden, inter, r = 16, 12, 4
    w_up, w_down = torch.randn(inter, hidden, generator=g), torch.randn(hidden, inter, generator=g)
    a_up, b_up = torch.randn(r, hidden, generator=g), torch.randn(inter, r, generator=g)
    a_dn, b_dn = torch.randn(r, inter, generator=g), torch.randn(hidden, r, generator=g)
    mask = (torch.rand(inter, generator=g) > 0.5).float()
    x = torch.randn(3, hidden, generator=g)
    masked = ((x @ (w_up + b_up @ a_up).T) * mask) @ (w_down + b_dn @ a_dn).T
    idx = layer_keep(torch.ones(2), mask, 1, 1).rows("up_proj")
    a_up2, b_up2 = slice_lora("up_proj", a_up, b_up, idx)
    a_dn2, b_dn2 = slice_lora("down_proj", a_dn, b_dn, idx)
    cut = (x @ (w_up[idx] + b_up2 @ a_up2).T) @ (w_down[:, idx] + b_dn2 @ a_dn2).T
    torch.testing.assert_close(cut, masked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["up_proj", "down_proj"])
@pytest.mark.parametrize("col_mode", ["dense", "requantize"])
def test_shrink_projection_nf4_lora(name: str, col_mode: str) -> None:
    """A PEFT LoRA layer over an NF4 Linear4bit: the cut layer computes the masked one's kept outputs."""
    torch.manual_seed(0)
    lin = torch.nn.Sequential()
    lin.add_module(name, bnb.nn.Linear4bit(128, 128, bias=False, quant_type="nf4", compute_dtype=torch.float32))
    w = torch.randn(128, 128) * 0.05
    lin[0].weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
    lin[0].weight = lin[0].weight._quantize("cpu")  # what .to(device) does on a real load
    assert lin[0].weight.quant_state is not None
    model = get_peft_model(lin, LoraConfig(r=4, target_modules=[name], init_lora_weights=False))
    layer = model.base_model.model[0]
    x = torch.randn(5, 128)
    idx = torch.arange(0, 128, 2)
    mask = torch.zeros(128)
    mask[idx] = 1
    with torch.no_grad():
        ref = layer(x)[:, idx] if name == "up_proj" else layer(x * mask)
        shrink_projection(layer, name, idx, col_mode)
        got = layer(x) if name == "up_proj" else layer(x[:, idx])
    if name == "up_proj" or col_mode == "dense":
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    else:
        assert 0 < (got - ref).norm() / ref.norm() < 0.15
