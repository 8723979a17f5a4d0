"""Helpers of benchmarks/gpu_check.sh, the one-shot GPU measurement (no network needed).

python benchmarks/gpu_model.py --shape llama3-8b --out DIR [--device cuda] [--tokenizer .gpudata/tokenizer]
    A Hugging Face Llama directory with random bf16 weights (normal, std 0.02, made on the device) of
    the Llama-3-8B shape, plus a small local tokenizer (only token ids matter: its ids lie inside the
    vocabulary). ``--shape tiny`` is the same layout, small enough for a CPU rehearsal.
python benchmarks/gpu_model.py --env
    Versions, the accelerator, and a bitsandbytes NF4 smoke test on it.
python benchmarks/gpu_model.py --allreduce --mib 256 [--backend nccl] [--json FILE]
    torch.distributed all_reduce in a world of one, timed. On one GPU this measures only NCCL's local
    reduction path (no link is crossed); it shows that the NCCL backend starts and runs.
python benchmarks/gpu_model.py --collect WORK OUT
    OUT/results.json from WORK: stage timings, the all-reduce figures, each run's headline numbers and
    the nvidia-smi samples taken during it. Standard library only, so it works whatever else failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3(.1)-8B: hidden 4096, 32 layers, 32 query / 8 KV heads of 128, MLP 14336, untied embeddings.
    "llama3-8b": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
    },
    "tiny": {
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "intermediate_size": 512,
        "vocab_size": 4096,
        "max_position_embeddings": 2048,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
    },
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DONE = "gpu_model.json"  # written last into the model directory: what was made, so a rerun can reuse it


def llama_config(shape: str) -> Any:
    from transformers import LlamaConfig

    s = dict(SHAPES[shape])
    rope_theta = s.pop("rope_theta")
    return LlamaConfig(
        **s,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        initializer_range=0.02,
        bos_token_id=0,  # the ids of the bundled tokenizer's <s> and </s>
        eos_token_id=1,
        pad_token_id=None,
        architectures=["LlamaForCausalLM"],
    )


def make_model(shape: str, out: Path, device: str, dtype_name: str, tokenizer: Path, seed: int = 0) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    want = {"shape": shape, "dtype": dtype_name, "seed": seed}
    done = out / DONE
    if done.is_file() and {k: json.loads(done.read_text()).get(k) for k in want} == want:
        print(f"{out}: already made ({done.read_text().strip()})", flush=True)
        return json.loads(done.read_text())
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype_name]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with torch.device(device):  # weights are created and initialised (normal, std 0.02) on the device
        model = AutoModelForCausalLM.from_config(llama_config(shape), dtype=dtype)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t_init = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    w = model.model.layers[0].mlp.down_proj.weight
    std = float(w.detach().float().std())
    if not 0.015 < std < 0.025:
        raise SystemExit(f"unexpected init: std of layers.0.mlp.down_proj.weight is {std:.4f}, not 0.02")
    t0 = time.perf_counter()
    model.save_pretrained(out, max_shard_size="5GB")  # safetensors (the only format transformers 5 writes)
    t_save = time.perf_counter() - t0
    del model, w
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer / name, out / name)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    info = {
        **want,
        "device": device,
        "params": n_params,
        "weight_bytes": size,
        "init_std": round(std, 5),
        "init_s": round(t_init, 2),
        "save_s": round(t_save, 2),
    }
    print(f"{out}: {n_params / 1e9:.3f} B params, {size / 2**30:.2f} GiB safetensors; " + json.dumps(info), flush=True)
    done.write_text(json.dumps(info) + "\n")
    return info


def check_tokenizer(out: Path) -> None:
    """The tokenizer loads the way the pipeline loads it, and its ids fit the model's vocabulary."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    vocab = AutoConfig.from_pretrained(out).vocab_size
    ids = tok("set nocompatible\n:help usr_01.txt", add_special_tokens=False)["input_ids"]
    if len(tok) > vocab or max(ids) >= vocab:
        raise SystemExit(f"tokenizer of {len(tok)} ids does not fit the vocabulary of {vocab}")
    print(f"tokenizer: {len(tok)} ids (vocabulary {vocab}), eos {tok.eos_token_id}", flush=True)


def env_report() -> None:
    import importlib
    import platform

    print(f"python {sys.version.split()[0]} {platform.platform()}; cpus {os.cpu_count()}")
    for name in (
        "torch",
        "deepspeed",
        "bitsandbytes",
        "transformers",
        "peft",
        "accelerate",
        "huggingface_hub",
        "tokenizers",
        "safetensors",
        "numpy",
        "pydantic",
        "datasets",
        "matplotlib",
    ):
        try:
            mod = importlib.import_module(name)
            shim = " (benchmarks/gpu_shims stand-in)" if getattr(mod, "SHIM", False) else ""
            print(f"{name} {getattr(mod, '__version__', '?')}{shim} from {Path(mod.__file__ or '?').parent}")
        except Exception as e:
            print(f"{name}: not importable ({type(e).__name__}: {e})")
    import torch

    print(f"torch cuda {torch.version.cuda}, available {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        mem = p.total_memory / 2**30
        print(f"device {p.name}, capability {p.major}.{p.minor}, {mem:.1f} GiB, {p.multi_processor_count} SMs")
        print(f"cudnn {torch.backends.cudnn.version()}, nccl {torch.cuda.nccl.version()}")
        print(f"bf16 supported {torch.cuda.is_bf16_supported()}")
    print(f"/tmp free {shutil.disk_usage('/tmp').free / 2**30:.1f} GiB")
    try:
        bnb_smoke("cuda" if torch.cuda.is_available() else "cpu")
    except Exception as e:
        print(f"bitsandbytes NF4 smoke test FAILED: {type(e).__name__}: {e}")


def bnb_smoke(device: str) -> None:
    """One NF4 layer (bf16 storage, as the pipeline quantizes) against its dequantized weight."""
    import bitsandbytes as bnb
    import torch

    try:
        from bitsandbytes.cextension import lib

        name = getattr(getattr(lib, "_lib", None), "_name", None)
        print(f"bitsandbytes native library: {name or lib}")
    except Exception as e:
        print(f"bitsandbytes native library: not loaded ({type(e).__name__}: {e})")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    lin = torch.nn.Linear(1024, 512, bias=False, dtype=dtype)
    q = bnb.nn.Linear4bit(
        1024, 512, bias=False, compute_dtype=dtype, quant_type="nf4", quant_storage=dtype, compress_statistics=True
    )
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4", quant_storage=dtype)
    q = q.to(device)
    x = torch.randn(8, 1024, dtype=dtype, device=device)
    deq = bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state).to(dtype)
    err = (q(x).float() - (x @ deq.t()).float()).abs().max().item()
    rel = (deq.float().cpu() - lin.weight.float()).norm().item() / lin.weight.float().norm().item()
    print(f"bitsandbytes NF4 on {device}: forward vs dequantized max |diff| {err:.3g}, weight rel. error {rel:.3f}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def allreduce(mib: int, backend: str, iters: int, json_path: Path | None) -> None:
    import torch
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    cuda = backend == "nccl"
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    t0 = time.perf_counter()
    dist.init_process_group(backend, rank=0, world_size=1, device_id=dev if cuda else None)
    dtype = torch.bfloat16 if cuda else torch.float32
    n = mib * 2**20 // torch.tensor([], dtype=dtype).element_size()
    x = torch.ones(n, dtype=dtype, device=dev)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    dist.all_reduce(x)  # the first call builds the communicator
    sync()
    t_init = time.perf_counter() - t0
    for _ in range(3):
        dist.all_reduce(x)
    sync()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        dist.all_reduce(x)
        sync()
        times.append(time.perf_counter() - t)
    ok = bool((x[:16] == 1).all().item())  # a sum over one rank leaves the values as they were
    dist.barrier()
    dist.destroy_process_group()
    med = sorted(times)[len(times) // 2]
    res = {
        "backend": backend,
        "world_size": 1,
        "dtype": str(dtype).replace("torch.", ""),
        "mib": mib,
        "iters": iters,
        "init_and_first_s": round(t_init, 4),
        "median_s": round(med, 6),
        "min_s": round(min(times), 6),
        "algbw_gib_s": round(mib / 1024 / med, 2),
        "values_ok": ok,
        "note": f"world of one on one device: {backend}'s local reduction path only, no GPU-GPU or network link",
    }
    if cuda:
        res["nccl_version"] = ".".join(map(str, torch.cuda.nccl.version()))
    print(json.dumps(res), flush=True)
    if json_path is not None:
        json_path.write_text(json.dumps(res, indent=1) + "\n")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _smi(path: Path) -> dict[str, Any] | None:
    """Max memory used and mean/max utilisation from `nvidia-smi --query-gpu=memory.used,utilization.gpu`."""
    try:
        rows = [r.split(",") for r in path.read_text().splitlines() if r.strip() and r[0].isdigit()]
        mem = [float(r[0]) for r in rows]
        util = [float(r[1]) for r in rows]
    except (OSError, ValueError, IndexError):
        return None
    if not rows:
        return None
    return {
        "samples": len(rows),
        "max_memory_used_mib": max(mem),
        "mean_util_pct": round(sum(util) / len(util), 1),
        "max_util_pct": max(util),
    }


def _progress(path: Path) -> dict[str, Any] | None:
    """From progress_NAME.tsv (seconds since the run started, rows in train_log.jsonl, every 5 s): when the
    first step was logged (start-up cost) and the step rate after it, to within the 5 s sampling."""
    try:
        rows = [tuple(map(int, r.split())) for r in path.read_text().splitlines() if r.strip()]
    except (OSError, ValueError):
        return None
    rows = [r for r in rows if len(r) == 2 and r[1] > 0]
    if not rows:
        return None
    (t1, n1), (t2, n2) = rows[0], rows[-1]
    return {
        "first_rows_seen_at_s": t1,
        "rows_then": n1,
        "last_seen_at_s": t2,
        "rows_last": n2,
        "step_s_estimate": round((t2 - t1) / (n2 - n1), 3) if n2 > n1 else None,
    }


def _digest(summary: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "steps",
        "world_size",
        "global_batch",
        "tokens_seen",
        "compute_dtype",
        "quantization",
        "target_sparsity",
        "achieved_sparsity",
        "decision_steps",
        "train_loss_final",
        "bad_steps",
        "peak_memory_mb",
        "perf",
        "version",
    )
    out = {k: summary.get(k) for k in keys}
    d = summary.get("distill") or {}
    out["distill"] = {k: d.get(k) for k in ("enabled", "teacher_time_share", "objective_time_share")}
    return out


def collect(work: Path, out: Path) -> None:
    res: dict[str, Any] = {"written": time.strftime("%Y-%m-%d %H:%M:%S"), "stages": [], "runs": {}}
    stages = work / "stages.jsonl"
    if stages.is_file():
        for line in stages.read_text().splitlines():
            with contextlib.suppress(ValueError):
                res["stages"].append(json.loads(line))
    res["model"] = _read_json(work / "model.json")
    res["allreduce"] = _read_json(work / "allreduce.json")
    for run in sorted(work.glob("runs/*")):
        if not run.is_dir():
            continue
        entry: dict[str, Any] = {}
        summary = _read_json(run / "summary.json")
        if summary is not None:
            entry["summary"] = _digest(summary)
        log = run / "train_log.jsonl"
        if log.is_file():
            rows = [r for r in log.read_text().splitlines() if r.strip()]
            entry["logged_steps"] = len(rows)
            entry["last_row"] = rows[-1] if rows else None
        entry["nvidia_smi"] = _smi(work / f"smi_{run.name}.csv")
        entry["progress"] = _progress(work / f"progress_{run.name}.tsv")
        res["runs"][run.name] = entry
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(out / "results.json")


def _g(x: Any, fmt: str = ".3g") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def print_results(path: Path) -> None:
    """The headline numbers of a results.json, a few lines per stage and run."""
    res = _read_json(path)
    if res is None:
        print(f"{path}: missing or unreadable")
        return
    print("stages: " + ", ".join(f"{s['stage']} exit {s['rc']} ({s['s']}s)" for s in res.get("stages", [])))
    ar = res.get("allreduce")
    if ar:
        print(
            f"all_reduce {ar['backend']} {ar['mib']} MiB {ar['dtype']}: median {_g(ar['median_s'])} s, "
            f"{_g(ar['algbw_gib_s'])} GiB/s, first call (communicator set-up) {_g(ar['init_and_first_s'])} s, "
            f"values ok {ar['values_ok']} ({ar['note']})"
        )
    m = res.get("model")
    if m:
        print(
            f"model {m['shape']} {m['dtype']}: {m['params'] / 1e9:.3f} B params, {m['weight_bytes'] / 2**30:.2f} GiB, "
            f"made in {m['init_s']} s on {m['device']}, saved in {m['save_s']} s"
        )
    for name, run in res.get("runs", {}).items():
        s = run.get("summary")
        smi = run.get("nvidia_smi") or {}
        if not s:
            print(f"run {name}: no summary.json; {run.get('logged_steps', 0)} steps logged, last {run.get('last_row')}")
            print(f"  progress {run.get('progress')}; nvidia-smi {smi or None}")
            continue
        p = s.get("perf") or {}
        mem = p.get("memory") or {}
        tokens_per_step = (s.get("tokens_seen") or 0) / max(s.get("steps") or 1, 1)
        step = p.get("step_s_median")
        print(
            f"run {name}: {s['steps']} steps of {int(tokens_per_step)} tokens, loss {_g(s['train_loss_final'])}, "
            f"sparsity {_g(s['achieved_sparsity'])} (decisions {s['decision_steps']}), bad steps {s['bad_steps']}"
        )
        print(
            f"  step s median {_g(step)} ({_g(tokens_per_step / step if step else None, '.0f')} tokens/s); "
            f"to final decision {_g(p.get('step_s_median_to_final_decision'))}, after "
            f"{_g(p.get('step_s_median_after_final_decision'))}; scoring {_g(p.get('score_s_per_event'))} s/event; "
            f"train {_g(p.get('train_s'))} s"
        )
        print(
            f"  peak_memory_mb {_g(s['peak_memory_mb'], '.0f')}; probe step {mem.get('probe_step')}: resident "
            f"{_g(mem.get('resident_mb'), '.0f')} MB + transient {_g(mem.get('transient_mb'), '.0f')} MB; "
            f"nvidia-smi max {smi.get('max_memory_used_mib')} MiB, util mean {smi.get('mean_util_pct')}%"
        )
        pr = run.get("progress") or {}
        print(f"  first step logged {pr.get('first_rows_seen_at_s')} s after the launch (5 s resolution)")
        d = s.get("distill") or {}
        print(
            f"  distill teacher share {_g(d.get('teacher_time_share'))}, objective {_g(d.get('objective_time_share'))}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--shape", choices=sorted(SHAPES), help="write a random-weight model of this shape to --out")
    mode.add_argument("--env", action="store_true", help="versions, accelerator, bitsandbytes smoke test")
    mode.add_argument("--allreduce", action="store_true", help="time all_reduce in a world of one")
    mode.add_argument("--collect", nargs=2, metavar=("WORK", "OUT"), help="write OUT/results.json from WORK")
    mode.add_argument("--print", type=Path, metavar="RESULTS", help="a short digest of a results.json")
    ap.add_argument("--out", type=Path, help="model directory to write (--shape)")
    ap.add_argument("--device", default=None, help="where the weights are made (default: cuda if available)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32", "fp16"))
    ap.add_argument("--tokenizer", type=Path, default=Path(".gpudata/tokenizer"), help="tokenizer files to copy")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here (--shape, --allreduce)")
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--backend", default=None, help="nccl or gloo (default: nccl if CUDA is available)")
    args = ap.parse_args(argv)
    if args.collect:
        collect(Path(args.collect[0]), Path(args.collect[1]))
        return 0
    if args.print:
        print_results(args.print)
        return 0
    if args.env:
        env_report()
        return 0
    import torch

    if args.allreduce:
        allreduce(args.mib, args.backend or ("nccl" if torch.cuda.is_available() else "gloo"), args.iters, args.json)
        return 0
    if args.out is None:
        ap.error("--shape needs --out")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = make_model(args.shape, args.out, device, args.dtype, args.tokenizer)
    check_tokenizer(args.out)
    if args.json is not None:
        args.json.write_text(json.dumps(info, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
