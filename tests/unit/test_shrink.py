"""Shrink in flight: the cut layer computes what the masked layer computed (pipeline/train/shrink.py)."""

from __future__ import annotations

import json

import bitsandbytes as bnb
import pytest
import torch
import yaml
from peft import LoraConfig, get_peft_model
from synthetic_runs import INTER, KV, D, make_run
from transformers import AutoModelForCausalLM

from pipeline.config.schema import ConfigError, config_from_dict, save_config
from pipeline.export.compact import ExportError, export, load_run
from pipeline.export.verify import compare, load_masked_model, logits, sample_inputs, verify
from pipeline.model.structure import decoder_layers
from pipeline.train.checkpoint import RUN_CONFIG, SHRINK_FILE
from pipeline.train.shrink import (
    ShrinkHistory,
    layer_keep,
    plan_keeps,
    relative,
    shrink_projection,
    slice_lora,
    slice_nf4_cols,
    slice_nf4_rows,
)


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


# ------------------------------------------------------------------ a whole model: history, replay, export


def _keeps(run, heads: torch.Tensor, channels: torch.Tensor, present=None):
    return plan_keeps(run.structure, heads, channels, present)


def _two_events(run):
    """A first cut at the run's masks with one more query head and 20 more channels per layer kept, then
    the run's masks: every_decision's nested cuts, the second relative to the first."""
    heads, channels = run.heads.clone(), run.channels.clone()
    for layer in range(heads.shape[0]):
        heads[layer, (heads[layer] == 0).nonzero()[:1]] = 1
        channels[layer, (channels[layer] == 0).nonzero()[:20]] = 1
    first = _keeps(run, heads, channels)
    return ShrinkHistory([(2, first), (4, _keeps(run, run.heads, run.channels, first))])


@pytest.mark.parametrize("masks", ["global_kv", "odd", "uniform_query"])
@pytest.mark.parametrize("col_mode", ["dense", "requantize"])
def test_cut_model_computes_the_masked_model(make_model, tmp_path, masks, col_mode):
    """apply_history (resume, --verify) on an NF4 PEFT model: the cut model's logits are the masked model's,
    to fp32 rounding with dense columns and within re-quantization noise otherwise."""
    run = load_run(make_run(tmp_path, make_model("llama"), masks))
    x = sample_inputs(run, n=2, seq_len=32, log=lambda _: None)
    ref = logits(load_masked_model(run)[0], x)
    run.cfg.pruning.shrink_columns = col_mode
    for history in (ShrinkHistory([(3, _keeps(run, run.heads, run.channels))]), _two_events(run)):
        run.shrink = history
        model, _ = load_masked_model(run)
        layer = decoder_layers(model)[0]
        kept = history.current[0]
        assert layer.self_attn.q_proj.base_layer.out_features == len(kept.plan.q_heads) * D
        assert layer.mlp.down_proj.base_layer.in_features == len(kept.plan.channels)
        assert layer.self_attn.num_key_value_groups == kept.kv_groups
        diff = compare(ref, logits(model, x))
        if col_mode == "dense":
            assert diff.rel < 1e-5, diff
        else:  # NF4 again on new block boundaries: small, not zero
            assert 0 < diff.rel < 0.3, diff  # random tiny weights: small logits, so a large relative error


def test_padding_heads_come_only_from_heads_still_held() -> None:
    """Uneven groups pad with masked heads; after a shrink only heads the cut model still holds can pad."""
    first = layer_keep(torch.tensor([1.0, 0, 0, 1, 1, 1, 1, 0]), torch.ones(2), heads_per_group=4, head_dim=1)
    assert first.plan.q_heads.tolist() == [0, 1, 3, 4, 5, 6]  # group 0: head 1 pads (2 is removed)
    heads = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0])  # group 0: one kept, needs one pad; lowest free is 1
    assert layer_keep(heads, torch.ones(2), 4, 1).plan.q_heads.tolist() == [0, 1, 4, 5]
    again = layer_keep(heads, torch.ones(2), 4, 1, present=first)
    assert again.plan.q_heads.tolist() == [0, 1, 4, 5]
    heads = torch.tensor([0.0, 0, 0, 1, 1, 1, 0, 0])  # group 0 keeps head 3: pads with 0 or 1, both held
    assert layer_keep(heads, torch.ones(2), 4, 1, present=first).plan.q_heads.tolist() == [0, 3, 4, 5]
    assert relative(torch.tensor([3, 5]), first.plan.q_heads).tolist() == [2, 4]
    with pytest.raises(RuntimeError, match="cannot come back"):
        relative(torch.tensor([2]), first.plan.q_heads)


def test_history_round_trip_and_adapter_at_base_shapes(make_model, tmp_path) -> None:
    run = load_run(make_run(tmp_path, make_model("llama"), "global_kv"))
    history = _two_events(run)
    path = tmp_path / "shrink.safetensors"
    history.save(path)
    back = ShrinkHistory.load(path, run.structure)
    assert back.steps() == [2, 4]
    for (_, a), (_, b) in zip(history.events, back.events, strict=True):
        for ka, kb in zip(a, b, strict=True):
            assert all(torch.equal(ka.units(n), kb.units(n)) for n in ("q_proj", "k_proj", "gate_proj"))
            assert ka.plan.padding == kb.plan.padding
    assert ShrinkHistory.load(tmp_path / "absent", run.structure).events == []
    keep, s = history.current[1], run.structure
    b = torch.randn(len(keep.rows("v_proj")), 4)
    full = history.expand_lora("base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight", b, s)
    assert full.shape == (KV * D, 4) and torch.equal(full[keep.rows("v_proj")], b) and full.abs().sum() == b.abs().sum()
    a = torch.randn(4, len(keep.rows("down_proj")))
    full = history.expand_lora("base_model.model.model.layers.1.mlp.down_proj.lora_A.default.weight", a, s)
    assert full.shape == (4, INTER) and torch.equal(full[:, keep.rows("down_proj")], a)
    same = history.expand_lora("base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight", b, s)
    assert same is b


def test_export_replays_the_requantized_columns(make_model, tmp_path) -> None:
    """compact's replay_columns (from the original weights) against the cut model training held: --verify."""
    run_dir = make_run(tmp_path, make_model("llama"), "global_kv")
    run = load_run(run_dir)
    _two_events(run).save(run_dir / SHRINK_FILE)
    cfg = run.cfg
    cfg.pruning.shrink, cfg.pruning.shrink_columns = "every_decision", "requantize"
    save_config(cfg, run_dir / RUN_CONFIG)
    run = load_run(run_dir)
    assert run.shrink.steps() == [2, 4]
    out = tmp_path / "compact"
    export(run, out, merge_into="dequantized", dtype=torch.float32, log=lambda _: None)
    report = verify(run, out, "dequantized", trust_remote_code=True, samples=2, seq_len=32, log=lambda _: None)
    assert report.diff.rel < 1e-5, report.diff
    run.cfg.pruning.shrink_columns = "dense"  # a reference without the re-quantization is measurably off
    masked, _ = load_masked_model(run)
    x = sample_inputs(run, n=2, seq_len=32, log=lambda _: None)
    compact = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert compare(logits(masked, x), logits(compact, x)).rel > 1e-4


def test_a_run_that_shrank_needs_its_history(make_model, tmp_path) -> None:
    run_dir = make_run(tmp_path, make_model("llama"), "global_kv")
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "shrink": {"steps": [4]}}))
    with pytest.raises(ExportError, match="shrink.safetensors is missing"):
        load_run(run_dir)


def test_yaml_off_is_the_off_choice(tmp_path) -> None:
    """``shrink: off`` in YAML is the boolean false; it means the choice off (true is no choice)."""
    base = {"model": {"path": "m"}, "data": {"train": "t.txt"}}
    cfg = config_from_dict({**base, "pruning": yaml.safe_load("shrink: off")}, check_environment=False)
    assert cfg.pruning.shrink == "off"
    with pytest.raises(ConfigError, match="pruning.shrink=True: must be one of off, final, every_decision"):
        config_from_dict({**base, "pruning": {"shrink": True}}, check_environment=False)
