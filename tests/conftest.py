"""Shared fixtures: tiny models (Llama GQA, Qwen2 with biases, Mistral) saved with a small tokenizer."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
DEMO_TEXT = ROOT / "pipeline" / "demo" / "text" / "train.txt"
DEMO_VALID = ROOT / "pipeline" / "demo" / "text" / "valid.txt"
VOCAB = 512

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# DeepSpeed's compiled CPU ops stay in the user's cache (building them takes a minute); only
# tokenized-data caches of test runs go to a per-session folder.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR",
    str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch_extensions"),
)
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="prune-tests-cache-")


@pytest.fixture(autouse=True)
def _no_process_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(DEMO_TEXT)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


def _config(arch: str, head_dim: int = 8, tied: bool = False):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=head_dim,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    raise ValueError(arch)


@pytest.fixture(scope="session")
def make_model(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    """Builds (once per arch) a tiny random model dir with weights of a real scale and the tokenizer;
    ``head_dim`` 32 gives a model that vLLM's CPU attention runs (it has no kernel for 8)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache: dict[str, Path] = {}

    def make(arch: str = "llama", head_dim: int = 8, tied: bool = False) -> Path:
        key = f"{arch}-hd{head_dim}" + ("-tied" if tied else "")
        if key not in cache:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(_config(arch, head_dim, tied), dtype=torch.float32)
            if arch == "qwen2":  # non-zero biases so that bias handling is exercised
                for name, p in model.named_parameters():
                    if name.endswith("bias"):
                        torch.nn.init.normal_(p, std=0.02)
            out = tmp_path_factory.mktemp(f"model-{key}")
            model.save_pretrained(out, safe_serialization=True)
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
            cache[key] = out
        return cache[key]

    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs that exercise everything a resume or a shrink must carry: adapter-rank pruning and rank dropout
# straddle the pruning decisions (tests/integration/test_resume.py, test_shrink_runs.py).
STATEFUL_SECTIONS = dict(
    train={"steps": 12, "micro_batch_size": 2, "grad_accum": 2, "lr": 0.01},
    lora={
        "r": 4,
        "alpha": 8,
        "rank_dropout": 0.2,
        "rank_pruning": {"enabled": True, "init_r": 6, "target_r": 3, "every": 2, "warmup": 0.1, "cooldown": 0.3},
    },
    pruning={"target_sparsity": 0.5, "prune_every": 2, "warmup": 0.2, "cooldown": 0.2},
)


def write_config(path: Path, model_dir: Path, out_dir: Path, **sections: dict) -> Path:
    """A small run config for tests; sections override defaults key by key."""
    import yaml

    cfg = {
        "model": {"path": str(model_dir), "quantization": "nf4", "dtype": "fp32"},
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": str(DEMO_TEXT), "eval": str(DEMO_VALID), "seq_len": 32, "eval_max_tokens": 512},
        "train": {"steps": 6, "micro_batch_size": 2, "grad_accum": 1, "lr": 0.01, "seed": 0},
        # round_to 1: the tests count exact units (auto rounding has its own tests).
        "pruning": {"target_sparsity": 0.5, "prune_every": 2, "warmup": 0.2, "cooldown": 0.2, "round_to": 1},
        "deepspeed": {"config": str(ROOT / "ds_configs" / "zero3_cpu.json")},
        "output": {"dir": str(out_dir)},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_pipeline(config: Path, *overrides: str, ranks: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs the real CLI: a plain process for ranks=1, the deepspeed launcher otherwise."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    script = str(ROOT / "pipeline" / "run.py")
    if ranks == 1:
        cmd = [sys.executable, script]
    else:
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(ranks),
            "--master_port",
            str(free_port()),
            script,
        ]
    cmd += ["--config", str(config), *overrides]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def read_summary(out_dir: Path) -> dict:
    return json.loads((out_dir / "summary.json").read_text())


@pytest.fixture
def restore_env():
    """The pipeline's launch discovery writes RANK/MASTER_PORT... into os.environ; undo it."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def file_tree(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` with its bytes: equal trees mean nothing was written or lost."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


TASK_DATA = ROOT / "tests" / "data" / "lm_eval" / "tiny_vim.jsonl"


SUMMARY = {  # the fields of summary.json the loggers and plots read
    "model_path": "models/tiny",
    "criterion": "lora",
    "scope": "global",
    "target_sparsity": 0.5,
    "achieved_sparsity": 0.4821,
    "eval_ppl_after": 12.5,
    "structure": {"num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 96},
    "kept_heads_per_layer": [8, 2],
    "kept_kv_heads_per_layer": [4, 1],
    "kept_channels_per_layer": [70, 30],
    "perf": {"step_s": 0.5},
}


TEXTS = ["the quick brown fox", "vim is a text editor", "insert mode and normal mode"]


@pytest.fixture
def tok(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def alpaca_record(t: str, extra: str = "") -> dict:
    return {"instruction": f"Repeat: {t}", "input": extra, "output": t}


def strict_json(text: str) -> object:
    def bad(c: str) -> None:
        raise ValueError(f"non-standard JSON constant {c}")

    return json.loads(text, parse_constant=bad)
