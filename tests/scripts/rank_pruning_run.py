"""Runs the real Trainer with rank pruning, then checks on every rank that removed adapter components
are exactly zero in the fp32 master, the working copy and both Adam moments, and saves logits of
the trained (masked) model for comparison with the saved, physically smaller adapter."""

import json
import sys
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from pipeline.config.schema import load_config
from pipeline.dist import comm as D
from pipeline.train.trainer import Trainer


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    cfg = load_config(args[0], args[1:])
    trainer = Trainer(cfg)
    trainer.run()
    rp = trainer.rank_pruner
    bad: list[str] = []
    for name, m in rp.layers:
        dead = ~rp.alive[name]
        for kind, sl in (("lora_A", (dead, slice(None))), ("lora_B", (slice(None), dead))):
            p = getattr(m, kind)["default"].weight
            tensors = {"fp32": safe_get_full_fp32_param(p)}
            for key in ("exp_avg", "exp_avg_sq"):
                tensors[key] = safe_get_full_optimizer_state(p, key)
            with D.gathered([p]):
                tensors["working"] = p.data.clone()
            for what, t in tensors.items():
                if t is None or t[sl].abs().sum() != 0:
                    bad.append(f"{name}.{kind} {what}")
    x = torch.arange(64).view(2, 32) % 500
    trainer.engine.eval()
    with torch.no_grad():
        logits = trainer.engine(input_ids=x).logits.float().cpu()
    if D.is_main():
        out = Path(cfg.output.dir)
        torch.save(logits, out / "check_logits.pt")
        dead_total = sum(int((~a).sum()) for a in rp.alive.values())
        (out / "check.json").write_text(json.dumps({"bad": bad, "dead": dead_total, "ranks": rp.ranks()}))


if __name__ == "__main__":
    main()
