"""model.path as a GGUF file or a Hugging Face repo id, resolved to one local directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, read_summary, run_pipeline, write_config
from huggingface_hub import ModelCard

from pipeline.export.cards import base_license, base_model_id
from pipeline.model.source import ModelError, classify, resolve_model_dir, source_record

LAYERS, HIDDEN, FFN, HEADS, KV = 2, 72, 96, 9, 3  # odd head counts, as in SmolLM2


def write_tiny_gguf(path: Path, tokenizer_dir: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer Llama GGUF (odd head counts, tied embeddings) with the test tokenizer; returns its tensors."""
    import gguf

    tj = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = dict(tj["model"]["vocab"])
    for t in tj.get("added_tokens", []):
        vocab[t["content"]] = t["id"]
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if i < 3 else gguf.TokenType.NORMAL for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_pad_token_id(2)
    g = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    shapes = {"token_embd.weight": (len(tokens), HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (HIDDEN,),
            f"blk.{i}.attn_q.weight": (HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_k.weight": (KV * head_dim, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV * head_dim, HIDDEN),
            f"blk.{i}.attn_output.weight": (HIDDEN, HEADS * head_dim),
            f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        }
    tensors = {}
    for name, shape in shapes.items():
        t = (np.ones(shape) if name.endswith("norm.weight") else g.normal(0, 0.05, shape)).astype(np.float32)
        tensors[name] = t
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    return path, write_tiny_gguf(path, tokenizer_dir)


def test_gguf_resolves_to_a_cached_hf_dir(tiny_gguf, tmp_path, monkeypatch) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path, tensors = tiny_gguf
    monkeypatch.setenv("LORA_PRUNE_CACHE", str(tmp_path / "cache"))
    d = resolve_model_dir(str(path))
    assert d.is_relative_to(tmp_path / "cache")
    cfg = AutoConfig.from_pretrained(d)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (LAYERS, HEADS, KV)
    assert cfg.tie_word_embeddings and "quantization_config" not in cfg.to_dict()
    model = AutoModelForCausalLM.from_pretrained(d)
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb, torch.from_numpy(tensors["token_embd.weight"]))
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # the tie survives
    # v and down are not permuted by the GGUF layout, so they round-trip exactly.
    v = model.model.layers[1].self_attn.v_proj.weight
    assert torch.equal(v, torch.from_numpy(tensors["blk.1.attn_v.weight"]))
    tok = AutoTokenizer.from_pretrained(d)
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert tok("set tabstop=4")["input_ids"] == ref("set tabstop=4")["input_ids"]
    assert source_record(d, str(path))["format"] == "gguf"
    # The second resolve reuses the conversion.
    mtime = (d / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_dir(str(path)) == d and (d / "model.safetensors").stat().st_mtime_ns == mtime


def test_bad_model_paths_name_the_fix(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(
        ModelError, match=r"model.path=org/not-cached: not in the local Hugging Face cache.*hf download"
    ):
        classify("org/not-cached")
    with pytest.raises(ModelError, match="no such GGUF file"):
        classify(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="not a directory, a .gguf file, or a Hugging Face repo id"):
        classify(str(tmp_path / "nowhere" / "x"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        classify(str(tmp_path / "empty"))


def test_hub_id_resolves_through_the_cache(tmp_path, monkeypatch) -> None:
    """A repo id is found in a Hugging Face cache laid out as the hub client writes it."""
    from transformers import LlamaConfig

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4).save_pretrained(snap)
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, snap / "model.safetensors")  # an empty file would be refused as truncated
    src = classify("org/tiny")
    assert src.kind == "hub" and src.path == snap
    assert source_record(snap, "org/tiny") == {"format": "hub", "repo_id": "org/tiny", "given": "org/tiny"}
    # the model card names it by its repo id, with the license of the base's own card
    (snap / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    assert base_model_id(snap, "org/tiny") == "org/tiny" and base_license(snap) == "mit"


@pytest.mark.distributed
def test_run_and_compact_from_a_gguf_file(tiny_gguf, tmp_path, monkeypatch) -> None:
    """model.path = a .gguf file: the real CLI trains on it (NF4, tied embeddings, 9/3 heads), and
    compact writes safetensors whose card names the GGUF source; --verify checks it equals the masked model."""
    path, _ = tiny_gguf
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", path, out, pruning={"target_sparsity": 0.3})
    monkeypatch.setenv("LORA_PRUNE_CACHE", str(tmp_path / "cache"))  # the subprocesses convert into it
    proc = run_pipeline(cfg)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = read_summary(out)
    assert summary["model_source"]["format"] == "gguf"
    st = summary["structure"]
    assert (st["num_attention_heads"], st["num_key_value_heads"]) == (HEADS, KV)
    compact = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "compact.py"),
            "--run",
            str(out),
            "--out",
            str(tmp_path / "c"),
            "--verify",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
        timeout=600,
    )
    assert compact.returncode == 0, compact.stderr[-4000:]
    shards = list((tmp_path / "c").glob("*.safetensors"))
    assert shards
    # The tie survives: one embedding tensor, no separate LM head, and the config says so.
    from safetensors import safe_open

    names = {k for f in shards for k in safe_open(f, "pt").keys()}  # noqa: SIM118
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert json.loads((tmp_path / "c" / "config.json").read_text())["tie_word_embeddings"] is True
    card = (tmp_path / "c" / "README.md").read_text()
    # the GGUF file names no Hub repo in its metadata: no base_model (never the file's or a folder's name)
    assert "GGUF file `tiny-llama.F32.gguf`" in card
    assert "base_model" not in ModelCard.load(tmp_path / "c" / "README.md").data.to_dict()
