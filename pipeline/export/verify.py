"""Check a compact model against the masked model it came from, and time both against the dense base.

The reference is the model as trained: the (NF4-quantized) base + the saved adapter + the masks as
forward hooks. ``dequantized`` merges reproduce it up to float rounding, so they are gated at 1e-4
relative (fp32; 5e-2 when either side runs in half precision); ``original`` merges differ from it by
the NF4 quantization error, which is reported and gated only with an explicit tolerance.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from pipeline.data.dataset import DataError, load_texts, tokenize_to_blocks
from pipeline.export.compact import Run
from pipeline.pruning.masks import Masks
from pipeline.train.shrink import apply_history

EXACT_TOL = {torch.float32: 1e-4}  # relative max-abs logit difference; other dtypes: HALF_TOL
HALF_TOL = 5e-2


class VerifyError(RuntimeError):
    """The compact model does not compute what the masked model computed."""


@dataclass
class LogitDiff:
    max_abs: float
    mean_abs: float
    rel: float  # max |compact - masked| / max |masked|
    top1: float  # fraction of positions with the same arg-max token
    positions: int

    def __str__(self) -> str:
        return (
            f"max |diff| {self.max_abs:.3e}, mean |diff| {self.mean_abs:.3e}, relative {self.rel:.3e}, "
            f"top-1 agreement {self.top1:.2%} over {self.positions} positions"
        )


def load_masked_model(run: Run, dtype: torch.dtype | None = None) -> tuple[nn.Module, Masks]:
    """The model as the run trained it: base (NF4 as in model_loading) + adapter + mask hooks."""
    dtype = dtype or run.train_dtype
    kwargs: dict[str, Any] = {"dtype": dtype}
    if run.cfg.model.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=run.cfg.model.double_quant,
            bnb_4bit_quant_storage=dtype,
        )
    model = AutoModelForCausalLM.from_pretrained(run.base_dir, **kwargs)
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False  # as in model_loading: no in-place CPU repacking
    model = PeftModel.from_pretrained(model, str(run.dir / "adapter"))
    model.eval()
    if run.shrink.events:  # the run cut its model in flight: the same cuts on the base (re-quantizing as it did)
        apply_history(model, run.shrink, run.cfg.pruning.shrink_columns)
    masks = Masks(run.structure)
    masks.load_state_dict({"heads": run.heads, "channels": run.channels})
    masks.set_kept(run.shrink.current)
    masks.attach(model)
    return model, masks


def sample_inputs(run: Run, n: int = 4, seq_len: int = 64, log: Callable[[str], None] = print) -> torch.Tensor:
    """``n`` windows of the run's eval (else train) text, tokenized as in training; random ids when
    neither file is readable here (a run copied from another machine)."""
    tokenizer = AutoTokenizer.from_pretrained(run.base_dir)
    for key, path in (("data.eval", run.cfg.data.eval), ("data.train", run.cfg.data.train)):
        if not path or not Path(path).is_file():
            continue
        try:
            ds = load_texts(path, run.cfg.data.text_field, key)
            blocks = tokenize_to_blocks(ds, tokenizer, seq_len, key, path, max_tokens=n * seq_len)
            return blocks[:n]
        except DataError as e:
            log(f"note: {e}")
    log("note: the run's data files are not readable here; verifying on random token ids")
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, run.base_config.vocab_size, (n, seq_len), generator=g)


@torch.inference_mode()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x).logits.float()


def compare(ref: torch.Tensor, out: torch.Tensor) -> LogitDiff:
    diff = (out - ref).abs()
    return LogitDiff(
        max_abs=diff.max().item(),
        mean_abs=diff.mean().item(),
        rel=(diff.max() / ref.abs().max().clamp_min(1e-30)).item(),
        top1=(out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        positions=ref.shape[0] * ref.shape[1],
    )


def default_tolerance(run: Run, merge_into: str, dtype: torch.dtype) -> float | None:
    """None for an original merge of an NF4 run: that difference is the quantization error, not a bug."""
    if merge_into == "original" and run.cfg.model.quantization == "nf4":
        return None
    if dtype == run.train_dtype and dtype in EXACT_TOL:
        return EXACT_TOL[dtype]
    return HALF_TOL


@torch.inference_mode()
def forward_speed(models: dict[str, nn.Module], x: torch.Tensor, warmup: int = 2, repeats: int = 5) -> dict[str, float]:
    """Median forward tokens/s of each model on the same input, interleaved so that load from other
    processes hits every model alike."""
    for _ in range(warmup):
        for m in models.values():
            m(input_ids=x)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            m(input_ids=x)
            times[name].append(time.perf_counter() - t0)
    return {k: x.numel() / statistics.median(v) for k, v in times.items()}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class VerifyReport:
    diff: LogitDiff
    tolerance: float | None
    params_dense: int
    params_compact: int
    tokens_per_s: dict[str, float]

    def lines(self) -> list[str]:
        gate = f"tolerance {self.tolerance:g}" if self.tolerance is not None else "not gated (NF4 quantization error)"
        tps = self.tokens_per_s
        return [
            f"compact vs masked logits: {self.diff}; {gate}",
            f"parameters: dense {self.params_dense:,} -> compact {self.params_compact:,} "
            f"({self.params_compact / self.params_dense:.1%})",
            f"forward tokens/s: dense {tps['dense']:.0f}, compact {tps['compact']:.0f} "
            f"(x{tps['compact'] / tps['dense']:.2f}; median, same input, interleaved)",
        ]


def verify(
    run: Run,
    compact_dir: Path,
    merge_into: str,
    trust_remote_code: bool,
    tolerance: float | None = None,
    samples: int = 4,
    seq_len: int = 64,
    warmup: int = 2,
    repeats: int = 5,
    log: Callable[[str], None] = print,
) -> VerifyReport:
    """Compare logits of the masked and the compact model; raise VerifyError above the tolerance."""
    x = sample_inputs(run, samples, seq_len, log)
    compact = AutoModelForCausalLM.from_pretrained(compact_dir, trust_remote_code=trust_remote_code).eval()
    dtype = next(compact.parameters()).dtype
    if tolerance is None:
        tolerance = default_tolerance(run, merge_into, dtype)
    masked, _masks = load_masked_model(run)
    diff = compare(logits(masked, x), logits(compact, x))
    del masked, _masks
    dense = AutoModelForCausalLM.from_pretrained(run.base_dir, dtype=dtype).eval()
    speed = forward_speed({"dense": dense, "compact": compact}, x, warmup, repeats)
    report = VerifyReport(diff, tolerance, n_params(dense), n_params(compact), speed)
    for line in report.lines():
        log(line)
    if tolerance is not None and not diff.rel <= tolerance:
        raise VerifyError(
            f"compact model differs from the masked model: relative logit difference {diff.rel:.3e} > "
            f"{tolerance:g} ({diff})"
        )
    return report
