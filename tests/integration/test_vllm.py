"""vLLM serves what compact exports: greedy tokens equal transformers', logprobs close.

vLLM runs in its own environment (``VLLM_PYTHON``, default ``.venv-vllm/bin/python``; .ci/run
builds it) through tools/vllm_generate.py; transformers runs here. Two exports: a global-scope
run on a Qwen2-layout model (q/k/v biases, GQA, per-layer widths with zero-head padding: the
Nemotron-NAS layout) and a uniform-scope Llama run (the stock architecture).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import DEMO_VALID, ROOT
from synthetic_runs import make_run
from transformers import AutoTokenizer

from benchmarks.serve import hf_greedy  # the same transformers side benchmarks/serve.py reports
from pipeline.export.compact import export, load_run

VLLM_PYTHON = Path(os.environ.get("VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
NEW_TOKENS = 12
pytestmark = [
    pytest.mark.distributed,  # vLLM starts an engine process
    pytest.mark.skipif(
        "VLLM_PYTHON" not in os.environ and not VLLM_PYTHON.is_file(),
        reason="no vLLM environment: see the README's Serving section (.ci/run builds .venv-vllm)",
    ),
]


def test_vllm_matches_transformers(make_model, tmp_path):
    exports = {}
    for arch, masks in (("qwen2", "global_kv"), ("llama", "uniform_kv")):
        run = load_run(make_run(tmp_path / arch, make_model(arch, head_dim=32), masks, "nf4"))
        exports[arch] = export(run, tmp_path / f"compact-{arch}", merge_into="dequantized", log=lambda _: None)
    qwen, llama = exports["qwen2"], exports["llama"]
    assert qwen.format == "nemotron-nas" and qwen.padding_params > 0 and llama.format == "hf"
    config = json.loads((qwen.out_dir / "config.json").read_text())
    assert config["qkv_bias"] is True and config["attention_bias"] is False

    tok = AutoTokenizer.from_pretrained(make_model("llama"))
    text = DEMO_VALID.read_text()
    prompts = [tok(text[i : i + 200])["input_ids"][:16] for i in (0, 500)]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    cmd = [str(VLLM_PYTHON), str(ROOT / "tools" / "vllm_generate.py"), "--prompts", str(tmp_path / "prompts.json")]
    for arch, res in exports.items():
        cmd += ["--model", str(res.out_dir), "--out", str(tmp_path / f"vllm-{arch}.json")]
    cmd += ["--max-new-tokens", str(NEW_TOKENS)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "2"}
    env.pop("PYTHONPATH", None)  # vLLM's environment, not this one
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    diffs = {}
    for arch, res in exports.items():
        served = json.loads((tmp_path / f"vllm-{arch}.json").read_text())["generations"]
        for i, (ours, theirs) in enumerate(zip(hf_greedy(res.out_dir, prompts, NEW_TOKENS), served, strict=True)):
            assert ours["tokens"] == theirs["tokens"], arch
            diffs[arch, i] = max(abs(a - b) for a, b in zip(ours["logprobs"], theirs["logprobs"], strict=True))
    assert max(diffs.values()) < 1e-4, diffs

    # tools/evaluate.py --engine vllm: the served model's perplexity on the windows training evaluates
    # on equals transformers' (packed windows split at document starts), and generation speed is timed.
    import importlib

    tool = importlib.import_module("pipeline.cli.evaluate")  # the command tools/evaluate.py wraps
    models = [arg for res in exports.values() for arg in ("--model", str(res.out_dir))]
    common = ["--text", str(DEMO_VALID), "--seq-len", "64", "--max-tokens", "3000", *models]
    assert tool.main([*common, "--speed-batch", "0", "--json", str(tmp_path / "hf.json")]) == 0
    vllm_args = ["--engine", "vllm", "--vllm-python", str(VLLM_PYTHON), "--gen-tokens", "8", "--gen-batch", "2"]
    assert tool.main([*common, *vllm_args, "--json", str(tmp_path / "vllm.json")]) == 0
    hf, served = (json.loads((tmp_path / f).read_text()) for f in ("hf.json", "vllm.json"))
    for m in hf:
        assert served[m]["ppl"] == pytest.approx(hf[m]["ppl"], rel=1e-4), m
        assert served[m]["params"] == hf[m]["params"] and served[m]["generate_tokens_per_s"] > 0
