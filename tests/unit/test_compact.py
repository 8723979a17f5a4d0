"""tools/compact.py: the compact model computes what the masked model computed, loads, and counts right.

Most run directories are built synthetically (a PEFT adapter with non-zero B, hand-made masks, a
config.yaml and a summary.json); one test compacts the output of the real pipeline CLI.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file, save_file
from synthetic_runs import HIDDEN, INTER, KV, MASKS, D, H, make_run
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from pipeline.config.schema import InputError
from pipeline.export.compact import (
    ExportError,
    export,
    load_run,
    module_names,
    nf4_roundtrip,
    plan_layer,
    serve_decilm,
    serve_hf,
)
from pipeline.export.verify import VerifyError, compare, load_masked_model, logits, sample_inputs, verify
from pipeline.train.checkpoint import RUN_CONFIG


def expected_params(base: int, heads: torch.Tensor, channels: torch.Tensor, bias: bool) -> int:
    """Parameters left after removing the masked units, counted from the masks alone."""
    removed = 0
    for layer in range(heads.shape[0]):
        q = int((heads[layer] != 0).sum())
        kv = int((heads[layer] != 0).view(KV, H // KV).any(-1).sum())
        ch = int((channels[layer] != 0).sum())
        removed += (H - q) * (2 * D * HIDDEN + D * bias) + (KV - kv) * (2 * D * HIDDEN + 2 * D * bias)
        removed += (INTER - ch) * 3 * HIDDEN
    return base - removed


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def no_partial(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


CASES = [  # arch, quantization, masks, extra LoRA settings
    ("llama", "nf4", "uniform_kv", {}),
    ("llama", "nf4", "global_kv", {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 3.0}}),
    ("qwen2", "nf4", "global_kv", {"use_rslora": True}),
    ("qwen2", "nf4", "uniform_query", {}),
    ("llama", "none", "uniform_query", {}),
    ("llama", "nf4", "uniform_6heads", {}),
    ("mistral", "none", "global_kv", {}),
    ("llama", "none", "odd", {}),
]


@pytest.mark.parametrize(("arch", "quant", "masks", "lora"), CASES, ids=[f"{a}-{q}-{m}" for a, q, m, _ in CASES])
def test_compact_equals_masked_model(make_model, tmp_path, arch, quant, masks, lora):
    model_dir = make_model(arch)
    run = load_run(make_run(tmp_path, model_dir, masks, quant, lora))
    out = tmp_path / "compact"
    # Small shards so that the sharded writer and index are exercised.
    result = export(
        run, out, merge_into="dequantized", dtype=torch.float32, max_shard_bytes=200_000, log=lambda _: None
    )
    files = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(files.values())) > 1 and all((out / f).is_file() for f in files.values())
    for f in ("config.json", "README.md", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f

    scope, _, heads, channels = MASKS[masks]
    custom = scope == "global" or (masks == "uniform_6heads" and arch == "llama")
    config = json.loads((out / "config.json").read_text())
    assert result.format == ("nemotron-nas" if custom else "hf")
    assert all((out / f).is_file() == custom for f in ("configuration_decilm.py", "modeling_decilm.py"))
    assert ("auto_map" in config) == custom and config["head_dim"] == D
    if custom:  # the layout's contract: one query-head count, per-layer KV groups and exact MLP widths
        assert config["model_type"] == "nemotron-nas" and config["architectures"] == ["DeciLMForCausalLM"]
        blocks = config["block_configs"]
        heads_served = [b["attention"].get("n_heads_in_group") for b in blocks]
        assert [config["num_attention_heads"] // g if g else 0 for g in heads_served] == result.widths[
            "num_key_value_heads"
        ]
        assert [b["ffn"].get("intermediate_size", 0) for b in blocks] == result.widths["intermediate_size"]
        assert all("ffn_mult" not in b["ffn"] for b in blocks)
        assert config["qkv_bias"] == (arch == "qwen2") and config["attention_bias"] is False
    compact = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=custom).eval()
    if not custom:
        assert type(compact).__module__.startswith("transformers.models.")  # stock, no remote code
    else:  # Qwen2: q/k/v biases survive, o_proj has none (as in the base)
        attn = next(layer.self_attn for layer in compact.model.layers if not layer.attn_no_op)
        assert (attn.q_proj.bias is not None) == (arch == "qwen2") and attn.o_proj.bias is None

    masked, _masks = load_masked_model(run)
    x = sample_inputs(run, n=2, seq_len=32, log=lambda _: None)
    diff = compare(logits(masked, x), logits(compact, x))
    assert diff.rel <= 1e-4 and diff.top1 == 1.0, diff

    layers = compact.model.layers
    q_out = [0 if getattr(lay, "attn_no_op", False) else lay.self_attn.q_proj.out_features // D for lay in layers]
    mlp_in = [0 if getattr(lay, "ffn_no_op", False) else lay.mlp.down_proj.in_features for lay in layers]
    assert q_out == result.widths["num_attention_heads"] and mlp_in == result.widths["intermediate_size"]
    base_params = n_params(AutoModelForCausalLM.from_pretrained(model_dir))
    assert n_params(compact) == result.params_after
    if masks != "odd":
        assert result.params_real == expected_params(base_params, heads, channels, bias=arch == "qwen2")
        assert base_params - result.params_real == run.summary["pruned_params"]
    else:  # layer 0: group 1 keeps 2 query heads (one at mask 0), both groups padded to 4; layer 1: MLP no-op
        assert result.widths == {
            "num_attention_heads": [8, 8],
            "num_key_value_heads": [2, 4],
            "intermediate_size": [50, 0],
        }
        assert result.padding_params == 5 * 2 * D * HIDDEN  # 4 zero query heads + the one at mask 0


def test_original_equals_dequantized_without_quantization(make_model, tmp_path):
    run = load_run(make_run(tmp_path, make_model("llama"), "uniform_kv", "none"))
    a = export(run, tmp_path / "a", merge_into="original", log=lambda _: None).out_dir
    b = export(run, tmp_path / "b", merge_into="dequantized", log=lambda _: None).out_dir
    ta, tb = (load_file(d / "model-00001-of-00001.safetensors") for d in (a, b))
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_sharded_base_and_half_precision_output(make_model, tmp_path):
    """A base saved in shards (with model.safetensors.index.json) compacts to the same tensors."""
    single = make_model("llama")
    sharded = tmp_path / "sharded-base"
    AutoModelForCausalLM.from_pretrained(single).save_pretrained(sharded, max_shard_size="100KB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (sharded / f).write_bytes((single / f).read_bytes())
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    run = make_run(tmp_path, single, "global_kv")
    outs = {}
    for name, base in (("single", single), ("sharded", sharded)):
        outs[name] = export(load_run(run, base=base), tmp_path / name, dtype=torch.bfloat16, log=lambda _: None)
    a, b = (load_file(r.out_dir / "model-00001-of-00001.safetensors") for r in outs.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == torch.bfloat16 for k in a)
    model = AutoModelForCausalLM.from_pretrained(outs["sharded"].out_dir, trust_remote_code=True)
    assert model.dtype == torch.bfloat16


def test_decilm_model_from_config_generates_with_no_op_blocks():
    """A no-op first attention block: the cache slots follow the attention blocks, so generating with
    the cache gives the same tokens as recomputing every step without it."""
    from pipeline.export.configuration_decilm import DeciLMConfig
    from pipeline.export.modeling_decilm import DeciLMForCausalLM

    def block(g, inter):
        attn = {"no_op": g is None, "replace_with_linear": False} | ({"n_heads_in_group": g} if g else {})
        ffn = {"no_op": inter is None, "replace_with_linear": False} | ({"intermediate_size": inter} if inter else {})
        return {"attention": attn, "ffn": ffn}

    cfg = DeciLMConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=6,  # does not divide hidden_size: head_dim is given
        head_dim=8,
        qkv_bias=True,
        block_configs=[block(None, 5), block(3, None), block(6, 48), block(1, 7)],
    )
    torch.manual_seed(0)
    model = DeciLMForCausalLM(cfg).eval()
    layers = model.model.layers
    assert not hasattr(layers[0], "self_attn") and not hasattr(layers[1], "mlp")
    kv = [lay.self_attn.k_proj.out_features // 8 for lay in layers[1:]]
    assert kv == [2, 1, 6] and [lay.self_attn.layer_idx for lay in layers[1:]] == [0, 1, 2]
    assert layers[1].self_attn.q_proj.bias is not None and layers[1].self_attn.o_proj.bias is None
    x = torch.randint(0, 64, (1, 5))
    cached = model.generate(x, max_new_tokens=6, do_sample=False)
    uncached = model.generate(x, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    with pytest.raises(ValueError, match="n_heads_in_group=4 does not divide 6"):
        DeciLMConfig(num_hidden_layers=1, num_attention_heads=6, head_dim=8, block_configs=[block(4, 5)])


@pytest.mark.parametrize(("dtype", "double_quant"), [(torch.float32, True), (torch.bfloat16, False)])
def test_nf4_roundtrip_matches_transformers_loader_bitwise(make_model, dtype, double_quant):
    model_dir = make_model("qwen2")
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_quant_storage=dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, quantization_config=quant)
    loaded = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(loaded) == module_names(model.config)[1]
    base = load_file(model_dir / "model.safetensors")
    for name, mod in loaded.items():
        theirs = bnb.functional.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
        assert torch.equal(nf4_roundtrip(base[f"{name}.weight"], dtype, double_quant), theirs), name


def test_plan_pads_uneven_groups_and_empty_layers():
    p = plan_layer(torch.tensor([1.0, 0, 1, 1, 0, 0, 0, 0]), torch.tensor([0.0, 1, 0, 1]), heads_per_group=2)
    assert p.q_heads.tolist() == [0, 1, 2, 3] and p.kv_heads.tolist() == [0, 1]
    assert p.head_scale.tolist() == [1, 0, 1, 1] and p.channels.tolist() == [1, 3] and p.padding == 1
    empty = plan_layer(torch.zeros(8), torch.zeros(4), heads_per_group=2)
    assert (empty.num_heads, empty.num_kv_heads, empty.intermediate_size, empty.padding) == (0, 0, 0, 0)
    # Served: nemotron-nas pads to the widest layer's query heads; a fully pruned block is a no-op,
    # except attention in the first layer (vLLM needs it there) and blocks whose bias would be lost.
    served = serve_decilm([empty, p, empty], o_bias=False, mlp_bias=False)
    assert [(s.num_heads, s.num_kv_heads, s.intermediate_size) for s in served] == [(4, 1, 0), (4, 2, 2), (0, 0, 0)]
    assert served[0].q_heads.tolist() == [-1] * 4 and served[0].padding == (4, 1, 0)
    biased = serve_decilm([p, empty], o_bias=True, mlp_bias=True)[1]
    assert (biased.num_heads, biased.num_kv_heads, biased.channels.tolist()) == (4, 1, [-1])
    hf = serve_hf([empty])[0]
    assert (hf.num_heads, hf.num_kv_heads, hf.intermediate_size, hf.padding) == (1, 1, 1, (1, 1, 1))


@pytest.mark.parametrize("name", ["configuration_decilm.py", "modeling_decilm.py"])
def test_modeling_code_imports_only_torch_and_transformers(name):
    tree = ast.parse((ROOT / "pipeline" / "export" / name).read_text())
    roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert roots <= {"__future__", "typing", "torch", "transformers"}, roots
    relative = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
    assert relative <= {"configuration_decilm"}  # the one sibling file that ships with it


def test_format_flag(make_model, tmp_path, capsys):
    run = make_run(tmp_path, make_model("llama"), "global_kv", "none")
    assert _compact(run, tmp_path / "hf", "--format", "hf") == 2
    err = capsys.readouterr().err
    assert "--format hf: layers differ in width" in err and "--format nemotron-nas" in err
    uniform = make_run(tmp_path, make_model("llama"), "uniform_kv", "none")
    assert _compact(uniform, tmp_path / "nas", "--format", "nemotron-nas") == 0
    config = json.loads((tmp_path / "nas" / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas" and len(config["block_configs"]) == 2
    out = capsys.readouterr().out
    assert "padding: 0 params" in out and "Nemotron-NAS layout" in out
    assert _compact(uniform, tmp_path / "x", "--format", "gguf") == 2
    assert "--format gguf: must be one of auto, hf, nemotron-nas" in capsys.readouterr().err


def test_verify_reports_and_gates(make_model, tmp_path):
    run = load_run(make_run(tmp_path, make_model("llama"), "global_kv"))
    reports = []

    def check(staged: Path, result) -> None:
        kw = {"samples": 2, "seq_len": 16, "warmup": 1, "repeats": 2, "log": lambda _: None}
        reports.append(verify(run, staged, result.merge_into, trust_remote_code=not result.stock, **kw))

    export(run, tmp_path / "ok", merge_into="dequantized", check=check, log=lambda _: None)
    r = reports[0]
    assert r.tolerance == 1e-4 and r.diff.rel <= 1e-4
    assert r.params_compact < r.params_dense and set(r.tokens_per_s) == {"dense", "compact"}
    assert all(v > 0 for v in r.tokens_per_s.values())
    # An original merge of an NF4 run differs by the quantization error: reported, gated only on request.
    export(run, tmp_path / "orig", merge_into="original", check=check, log=lambda _: None)
    assert reports[1].tolerance is None and reports[1].diff.rel > 1e-4

    def strict(staged: Path, result) -> None:
        verify(run, staged, "original", trust_remote_code=True, tolerance=1e-4, samples=1, seq_len=8, repeats=1)

    out = tmp_path / "bad"
    with pytest.raises(VerifyError, match="relative logit difference"):
        export(run, out, merge_into="original", check=strict, log=lambda _: None)
    assert no_partial(out)


# ---------------------------------------------------------------------------------------- bad input


@pytest.fixture
def good_run(make_model, tmp_path) -> Path:
    return make_run(tmp_path, make_model("llama"), "uniform_kv")


def _compact(run: Path, out: Path, *extra: str) -> int:
    saved = list(sys.path)  # the script rewrites sys.path[0]; spawned workers of later tests need it back
    try:
        cli = importlib.import_module("pipeline.cli.compact")  # the command tools/compact.py wraps
        return cli.main(["--run", str(run), "--out", str(out), *extra])
    finally:
        sys.path[:] = saved


@pytest.mark.parametrize(
    ("remove", "message"),
    [
        ("masks.safetensors", r"masks.safetensors is missing"),
        ("adapter/adapter_model.safetensors", r"adapter_model.safetensors is missing"),
        ("summary.json", r"summary.json is missing: the run has not finished"),
    ],
)
def test_missing_files_are_named(good_run, tmp_path, capsys, remove, message):
    (good_run / remove).unlink()
    out = tmp_path / "out"
    assert _compact(good_run, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert no_partial(out)


def test_run_from_another_model_is_refused(good_run, make_model, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"summary.json was trained on another model.*model_type llama vs qwen2"):
        export(load_run(good_run, base=make_model("qwen2")), out)
    assert no_partial(out)
    masks = load_file(good_run / "masks.safetensors")
    save_file(
        {"heads": masks["heads"][:, :4].contiguous(), "channels": masks["channels"]}, good_run / "masks.safetensors"
    )
    with pytest.raises(ExportError, match=r"masks.safetensors: masks: heads has shape \(2, 4\)"):
        load_run(good_run)


def test_run_config_from_another_version_is_read(good_run):
    cfg = good_run / RUN_CONFIG
    cfg.write_text(cfg.read_text() + "extra_section: {a: 1}\n")
    cfg.write_text(cfg.read_text().replace("\npruning:\n", "\npruning:\n  future_knob: 3\n"))  # top level
    assert "['pruning.future_knob', 'extra_section']" in load_run(good_run).notes[0]


def test_adapter_not_matching_base_is_refused(good_run, tmp_path):
    path = good_run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if "layers.1.mlp.down_proj.lora_B" in k)
    tensors[key] = torch.zeros(HIDDEN + 8, 4)
    save_file(tensors, path)
    out = tmp_path / "out"
    with pytest.raises(ExportError, match=r"adapter_model.safetensors: .*down_proj adapter is .* pass --base"):
        export(load_run(good_run), out, log=lambda _: None)
    assert no_partial(out)  # failed half-way through the weights: the staged directory is gone


def test_existing_output_needs_overwrite(good_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="exists and is not empty.*--overwrite"):
        export(load_run(good_run), out)
    assert (out / "keep.txt").is_file()
    # --overwrite replaces only a previous export: a directory of other files is refused, untouched.
    with pytest.raises(InputError, match="does not hold a model written by tools/compact.py"):
        export(load_run(good_run), out, overwrite=True, log=lambda _: None)
    assert (out / "keep.txt").read_text() == "x"
    (out / "keep.txt").unlink()
    export(load_run(good_run), out, log=lambda _: None)
    first = (out / "config.json").read_text()
    export(load_run(good_run), out, overwrite=True, log=lambda _: None)  # a previous export: replaced
    assert (out / "config.json").read_text() == first
    (out / "notes.txt").write_text("mine")  # an export plus a file of the user's: refused, named
    with pytest.raises(InputError, match=r"files compact did not write \(notes.txt\)"):
        export(load_run(good_run), out, overwrite=True, log=lambda _: None)
    assert (out / "notes.txt").read_text() == "mine" and (out / "config.json").is_file()
    with pytest.raises(ExportError, match="would overwrite"):
        export(load_run(good_run), good_run, overwrite=True)


# ------------------------------------------------------------------------------------- real pipeline


def test_nf4_replayed_in_the_recorded_compute_dtype(make_model, tmp_path):
    # A run trained in bf16 (a GPU) and compacted here replays NF4 in bf16, not in this machine's "auto" (fp32).
    run_dir = make_run(tmp_path, make_model("llama"), "global_kv", "nf4")
    assert load_run(run_dir).train_dtype == torch.float32  # no record: "auto" as on this machine
    summary = json.loads((run_dir / "summary.json").read_text())
    (run_dir / "summary.json").write_text(json.dumps({**summary, "compute_dtype": "bf16"}))
    run = load_run(run_dir)
    assert run.train_dtype == torch.bfloat16
    from pipeline.export.verify import load_masked_model

    model, _ = load_masked_model(run)
    assert next(model.parameters()).dtype == torch.bfloat16  # --verify's reference computes in it too
