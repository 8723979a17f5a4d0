"""Per-GPU memory and communication plan for a run of this pipeline (formulas: benchmarks/planner.py).

python tools/plan.py --model llama2-70b --nodes 2 --gpus-per-node 8 [--seq-len 2048] [--micro-batch 1]
    [--grad-accum 1] [--lora-r 8] [--target-modules q_proj,...] [--gpu-mem-gb 80] [--ds-config JSON]
    [--score-every 1] [--link-gbps 25] [--dtype bf16] [--quantization nf4] [--json]

python tools/plan.py --config CONFIG.yaml [dotted.key=value ...] [--nodes 2 ...]
    reads the model (model.path), sequence length, batch, LoRA, dtype, quantization, score_every and
    DeepSpeed JSON from the run config (load_config, the same rules as a run); flags given override it.

--model is a preset (llama2-70b, llama3-70b, llama2-7b, llama3-8b), a Hugging Face model directory
or its config.json. Exit status 0 when the plan fits the GPU memory, 1 when it does not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.errors import InputError

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    from benchmarks import planner as P

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help=f"preset ({', '.join(P.PRESETS)}), model dir or config.json")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--target-modules", default=",".join(P.MODULES), help="comma-separated projections")
    ap.add_argument("--dtype", choices=tuple(P.DTYPE_BYTES), default="bf16")
    ap.add_argument("--quantization", choices=("nf4", "none"), default="nf4")
    ap.add_argument("--no-double-quant", action="store_true")
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--gpu-mem-gb", type=float, default=80.0, help="GPU memory, GiB")
    ap.add_argument("--reserve-gb", type=float, default=4.0, help="CUDA context, NCCL buffers, fragmentation (GiB)")
    ap.add_argument("--score-every", type=int, default=1, help="pruning.score_every")
    ap.add_argument("--link-gbps", type=float, default=25.0, help="GB/s per rank for the time estimate")
    ap.add_argument("--ds-config", default=str(ROOT / "ds_configs" / "zero3.json"), help="ZeRO-3 bucket settings")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    ap.add_argument("--config", help="a run config: its settings become the defaults of the flags above")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides of --config")
    pre, _ = ap.parse_known_args(argv)
    try:
        if pre.config:
            ap.set_defaults(**_config_defaults(pre.config, pre.overrides))
        elif pre.overrides:
            raise InputError(f"overrides {pre.overrides} need --config CONFIG.yaml")
        args = ap.parse_args(argv)
        if not args.model:
            raise InputError("--model (a preset, model directory or config.json) or --config CONFIG.yaml is required")
        model = P.load_model_spec(args.model)
        settings = P.Settings(
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            seq_len=args.seq_len,
            micro_batch=args.micro_batch,
            grad_accum=args.grad_accum,
            lora_r=args.lora_r,
            target_modules=tuple(m.strip() for m in args.target_modules.split(",") if m.strip()),
            dtype=args.dtype,
            quantization=args.quantization,
            double_quant=not args.no_double_quant,
            gradient_checkpointing=not args.no_gradient_checkpointing,
            gpu_mem_gb=args.gpu_mem_gb,
            reserve_gb=args.reserve_gb,
            score_every=args.score_every,
            link_gbps=args.link_gbps,
            zero=P.ZeroSettings.from_ds_config(args.ds_config),
        )
        p = P.plan(model, settings)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(P.plan_dict(p), indent=2) if args.json else P.format_plan(p))
    return 0 if p.fits else 1


def _config_defaults(config: str, overrides: list[str]) -> dict[str, object]:
    """The plan's settings from a run config, read with the run's own loader."""
    from pipeline.config.schema import load_config

    cfg = load_config(config, overrides)
    lora_r = cfg.lora.rank_pruning.init_r if cfg.lora.rank_pruning.enabled else cfg.lora.r
    return {
        "model": cfg.model.path,
        "seq_len": cfg.data.seq_len,
        "micro_batch": cfg.train.micro_batch_size,
        "grad_accum": cfg.train.grad_accum,
        "lora_r": lora_r,
        "target_modules": ",".join(cfg.lora.target_modules),
        "dtype": "bf16" if cfg.model.dtype == "auto" else cfg.model.dtype,  # auto is bf16 on a GPU
        "quantization": cfg.model.quantization,
        "no_double_quant": not cfg.model.double_quant,
        "no_gradient_checkpointing": not cfg.train.gradient_checkpointing,
        "score_every": cfg.pruning.score_every,
        "ds_config": cfg.deepspeed.config,
    }
