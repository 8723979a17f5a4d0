"""Compact a finished run into a smaller Hugging Face model: merge the LoRA adapter, cut pruned units.

python tools/compact.py --run RUN_DIR --out COMPACT_DIR [--base MODEL_PATH]
    [--format auto|hf|nemotron-nas] [--merge-into original|dequantized] [--dtype bf16|fp16|fp32] [--verify]
    [--overwrite]

--format hf writes the base's stock architecture (refused when the run's widths do not fit it);
nemotron-nas writes the Nemotron-NAS (DeciLM) layout, per-layer widths that vLLM serves natively
and transformers loads with trust_remote_code; auto (default) writes hf when it can, else nemotron-nas.

--merge-into original (default) merges the adapter into the full-precision base; dequantized merges
it into the NF4-dequantized base the adapter was trained against, which reproduces the masked model
exactly. --verify compares the compact model's logits with the masked model's (base + adapter +
masks, as trained) and times it against the dense base; it fails (exit 1, nothing published) when a
dequantized merge differs by more than 1e-4 relative in fp32 (5e-2 in half precision), or above
--tolerance when given. An original merge of an NF4 run is only reported, unless --tolerance is set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.errors import InputError
from pipeline.train.stops import RunStopped


def _size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory (output.dir of a finished run)")
    ap.add_argument("--out", required=True, help="directory to write the compact model to")
    ap.add_argument("--base", default=None, help="base model directory (default: model.path recorded in the run)")
    ap.add_argument("--format", default="auto", help="auto (default), hf or nemotron-nas")
    ap.add_argument("--merge-into", choices=("original", "dequantized"), default="original")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None, help="default: the base's dtype")
    ap.add_argument("--max-shard-size", type=_size, default="2GB", help="e.g. 500MB, 2GB (default 2GB)")
    ap.add_argument("--overwrite", action="store_true", help="replace --out if it holds only a previous export")
    ap.add_argument("--verify", action="store_true", help="compare with the masked model and time both")
    ap.add_argument("--tolerance", type=float, default=None, help="relative logit tolerance for --verify")
    ap.add_argument("--verify-samples", type=int, default=4, help="sequences for --verify (default 4)")
    ap.add_argument("--verify-seq-len", type=int, default=64, help="tokens per sequence for --verify (default 64)")
    ap.add_argument("--speed-repeats", type=int, default=5, help="timed forwards per model (default 5)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # on a shared CPU, fewer threads time more reliably
    from pipeline.export.compact import DTYPES, ExportResult, export, load_run
    from pipeline.export.verify import VerifyError, verify

    def check(staged: Path, result: ExportResult) -> None:
        report = verify(
            run,
            staged,
            args.merge_into,
            trust_remote_code=not result.stock,
            tolerance=args.tolerance,
            samples=args.verify_samples,
            seq_len=args.verify_seq_len,
            repeats=args.speed_repeats,
        )
        with open(staged / "README.md", "a") as f:
            f.write("\n## Verification (tools/compact.py --verify)\n\n" + "".join(f"- {s}\n" for s in report.lines()))

    try:
        run = load_run(args.run, args.base)
        result = export(
            run,
            args.out,
            merge_into=args.merge_into,
            dtype=DTYPES[args.dtype] if args.dtype else None,
            max_shard_bytes=args.max_shard_size,
            overwrite=args.overwrite,
            check=check if args.verify else None,
            fmt=args.format,
        )
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except VerifyError as e:
        print(f"error: verification failed, {args.out} not written: {e}", file=sys.stderr)
        return 1
    except RunStopped as e:  # SIGTERM: the staging directory is gone, --out untouched
        print(f"stopped: {e}", file=sys.stderr)
        return e.exit_code
    w = result.widths
    kind = "stock architecture" if result.stock else "Nemotron-NAS layout (trust_remote_code=True)"
    dtype = str(result.dtype).removeprefix("torch.")
    print(f"wrote {result.out_dir}: {kind}, {dtype}, merged into {result.merge_into}")
    before, real, served = result.params_before, result.params_real, result.params_after
    print(f"parameters: {before:,} -> {real:,} real ({real / before:.1%}), {served:,} served")
    print(f"padding: {result.padding_params:,} params, FLOPs per token {result.padding_flops}")
    print(f"per layer (served, 0 = no-op): heads {w['num_attention_heads']}, KV heads {w['num_key_value_heads']}")
    print(f"per layer (served, 0 = no-op): MLP channels {w['intermediate_size']}")
    return 0
