"""Benchmark the pruning criteria side by side: same model, data, steps, batch and seed for all.

``tools/bench.py`` is the CLI; ``benchmarks/report.py`` writes ``report.md`` and the plots.

Every training run is the real pipeline (``pipeline/run.py``: one process, a DeepSpeed ZeRO-3
engine), started as a subprocess so that its memory and timing are its own, from one base config
(``OUT/base.yaml``) plus per-run overrides:

* ``dense-nf4`` (and ``dense-none`` when a method needs the full-precision base): plain LoRA
  fine-tuning at target sparsity 0, the quality ceiling and the baseline for memory and step time.
* ``prune-METHOD-SCOPE-SPARSITY``: pruning while fine-tuning, for every method, scope and sparsity.
* ``oneshot-METHOD``: ``calib_steps`` scoring steps on the pretrained model at a learning rate of
  1e-12 (so the adapters stay at their initialisation, B = 0 to within 1e-11). The bench turns the
  run's smoothed scores into masks at each sparsity and scope with the pipeline's own selection
  (``pipeline/pruning/selection.py``) and evaluates the masked model with no training: "right after masking".
* ``speed-plain-METHOD`` and ``speed-METHOD``, for ``lora`` and ``full_grad``: a short plain LoRA
  run and a short pruning run that scores on every step, started together after everything else
  (so that both see the same load), for the step-time overhead.

Methods: ``lora`` (LoRA-guided, NF4 base), ``full_grad`` (LLM-Pruner element-wise Taylor on the
exact weight gradient; full-precision base, the reference), ``taylor`` (mask gradient), ``magnitude``,
``random``, and ``lora_fp32`` (the LoRA-guided criterion on the full-precision base, a control that
separates the criterion from the base precision when comparing with ``full_grad``; first scope only).

After the runs, in this process: the one-shot evaluations, and the compact models of the ``lora``
runs (``pipeline/export/compact.py``, merged into the dequantized base) timed against the dense model,
interleaved on the same input (``export_verify.forward_speed``). Memory and communication figures
come from the ``perf`` section every run writes into its summary (``pipeline/train/perf.py``).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from pipeline.config.schema import Config, InputError, load_config

ROOT = Path(__file__).resolve().parent.parent
# method -> (pruning.criterion, model.quantization)
METHODS: dict[str, tuple[str, str]] = {
    "lora": ("lora", "nf4"),
    "full_grad": ("full_grad", "none"),
    "taylor": ("taylor", "nf4"),
    "magnitude": ("magnitude", "nf4"),
    "random": ("random", "nf4"),
    "lora_fp32": ("lora", "none"),
}
CONTROLS = ("lora_fp32",)  # run in the first scope only
SPEED_METHODS = ("lora", "full_grad")  # timed against plain LoRA in pairs
SCOPES = ("global", "uniform")
ONESHOT_LR = 1e-12
# The setting of configs/vimdoc.yaml and ../shared/METHODS.md, in one process: global batch
# 4 x 2 micro-batches of 128 tokens, LoRA r=8 on all projections, perplexity over the first
# 40,000 eval tokens in windows of 256; everything else is the pipeline's default.
BASE_CONFIG: dict[str, dict[str, Any]] = {
    "lora": {"r": 8, "alpha": 16},
    "data": {"seq_len": 128, "eval_seq_len": 256, "eval_max_tokens": 40000},
    "train": {"micro_batch_size": 4, "grad_accum": 2},
}


class BenchError(InputError):
    """Bad benchmark arguments; the message names the option and the fix."""


@dataclass
class BenchSettings:
    model: str
    train: str
    eval: str
    out: str = "runs/bench"
    sparsities: tuple[float, ...] = (0.2, 0.5)
    methods: tuple[str, ...] = tuple(METHODS)
    scopes: tuple[str, ...] = SCOPES
    steps: int = 100
    calib_steps: int = 8  # one-shot scoring steps (calibration batches)
    seed: int = 0
    jobs: int = 2  # training runs at once
    threads: int = 1  # torch threads per run and for the in-process measurements
    ds_config: str = str(ROOT / "ds_configs" / "zero3_cpu.json")
    overrides: tuple[str, ...] = ()  # dotted.key=value for every run
    speed_steps: int = 20  # steps of each timed pair (plain LoRA, pruning with scoring on every step)
    speed_batch: int = 8  # windows per timed forward
    speed_repeats: int = 15
    comm_world: int = 2  # world size for the planned per-step traffic

    def check(self) -> None:
        errs: list[str] = []
        if not (Path(self.model) / "config.json").is_file():
            errs.append(f"--model {self.model}: not a Hugging Face model directory (no config.json)")
        for opt, path in (("--train", self.train), ("--eval", self.eval), ("--ds-config", self.ds_config)):
            if not Path(path).exists():
                errs.append(f"{opt} {path}: does not exist")
        if not self.sparsities or not all(0 < s < 1 for s in self.sparsities):
            errs.append(f"--sparsities {','.join(map(str, self.sparsities))}: each must be in (0, 1), e.g. 0.2,0.5")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            errs.append(f"--criteria {','.join(self.methods)}: choose from {', '.join(METHODS)}")
        bad = [s for s in self.scopes if s not in SCOPES]
        if bad or not self.scopes:
            errs.append(f"--scopes {','.join(self.scopes)}: choose from {', '.join(SCOPES)}")
        for opt, v in (
            ("--steps", self.steps),
            ("--calib-steps", self.calib_steps),
            ("--jobs", self.jobs),
            ("--threads", self.threads),
            ("--speed-batch", self.speed_batch),
            ("--speed-repeats", self.speed_repeats),
            ("--comm-world", self.comm_world),
        ):
            if v < 1:
                errs.append(f"{opt}={v}: must be >= 1")
        if self.speed_steps < 3:
            errs.append(f"--speed-steps={self.speed_steps}: must be >= 3 (steps 1 and 2 are not timed)")
        if errs:
            raise BenchError("benchmark: " + "; ".join(errs))


@dataclass(frozen=True)
class RunSpec:
    name: str
    kind: str  # dense | prune | oneshot
    method: str | None
    scope: str | None
    sparsity: float
    quantization: str
    overrides: tuple[str, ...]


def _prune(name: str, kind: str, method: str, scope: str | None, sparsity: float, *extra: str) -> RunSpec:
    crit, q = METHODS[method]
    args = (f"model.quantization={q}", f"pruning.criterion={crit}", f"pruning.target_sparsity={sparsity}")
    if scope:
        args += (f"pruning.scope={scope}",)
    return RunSpec(name, kind, method, scope, sparsity, q, args + extra)


def _plain(name: str, kind: str, q: str, *extra: str) -> RunSpec:
    return RunSpec(name, kind, None, None, 0.0, q, (f"model.quantization={q}", "pruning.target_sparsity=0", *extra))


def _short(steps: int) -> tuple[str, ...]:
    """A short run that scores on every step and decides once, at its end, without evaluation."""
    return (
        f"train.steps={steps}",
        "pruning.warmup=0",
        "pruning.cooldown=0",
        f"pruning.prune_every={steps}",
        "data.eval=",
    )


def plan_runs(st: BenchSettings) -> list[RunSpec]:
    """Every quality run, longest first (high sparsities), the one-shot scoring runs last.

    ``lora_fp32`` is a control (does the NF4 base change the ``lora`` criterion's outcome?) and
    runs in the first scope only."""
    quants = sorted({METHODS[m][1] for m in st.methods} | {"nf4"}, key=lambda q: q != "nf4")
    runs = [_plain(f"dense-{q}", "dense", q) for q in quants]
    for s in sorted(st.sparsities, reverse=True):
        for scope in st.scopes:
            for m in st.methods:
                if m in CONTROLS and scope != st.scopes[0]:
                    continue
                runs.append(_prune(f"prune-{m}-{scope}-{s:g}", "prune", m, scope, s))
    k = min(st.calib_steps, st.steps)
    # lr 1e-12: the adapters stay at their initialisation; evaluation happens here, per sparsity and scope.
    runs += [
        _prune(f"oneshot-{m}", "oneshot", m, None, max(st.sparsities), *_short(k), f"train.lr={ONESHOT_LR}")
        for m in st.methods
    ]
    return runs


def speed_pairs(st: BenchSettings) -> list[tuple[RunSpec, RunSpec]]:
    """(plain LoRA, pruning run) pairs started together, so that both see the same machine load."""
    methods = [m for m in SPEED_METHODS if m in st.methods] or [st.methods[0]]
    return [
        (
            _plain(f"speed-plain-{m}", "speed", METHODS[m][1], *_short(st.speed_steps)),
            _prune(f"speed-{m}", "speed", m, None, max(st.sparsities), *_short(st.speed_steps)),
        )
        for m in methods
    ]


def base_config(st: BenchSettings) -> dict[str, Any]:
    cfg = json.loads(json.dumps(BASE_CONFIG))
    cfg["model"] = {"path": str(Path(st.model).resolve()), "quantization": "nf4"}
    cfg["data"].update(train=str(Path(st.train).resolve()), eval=str(Path(st.eval).resolve()))
    cfg["train"].update(steps=st.steps, seed=st.seed)
    cfg["deepspeed"] = {"config": str(Path(st.ds_config).resolve())}
    return cfg


@dataclass
class RunResult:
    spec: RunSpec
    status: str  # ok | reused | failed
    seconds: float
    args: list[str]
    summary: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "reused")


def _run_env(threads: int) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    env.update(TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore")
    env.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    return env


def launch(spec: RunSpec, st: BenchSettings, base_yaml: Path, base: dict[str, Any]) -> RunResult:
    """One run of pipeline/run.py; a finished run with the same config and arguments is reused."""
    out = Path(st.out)
    run_dir, log = out / "runs" / spec.name, out / "logs" / f"{spec.name}.log"
    args = [*st.overrides, *spec.overrides, f"output.dir={run_dir}"]
    stamp_path, stamp = out / "logs" / f"{spec.name}.json", {"base": base, "args": args}
    summary_path = run_dir / "summary.json"
    if summary_path.is_file() and stamp_path.is_file():
        old = json.loads(stamp_path.read_text())
        if {k: old.get(k) for k in stamp} == stamp:  # the seconds it took then are kept
            return RunResult(spec, "reused", old.get("seconds", 0.0), args, json.loads(summary_path.read_text()))
    shutil.rmtree(run_dir, ignore_errors=True)
    stamp_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "pipeline" / "run.py"), "--config", str(base_yaml), *args]
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_run_env(st.threads), check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not summary_path.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return RunResult(spec, "failed", seconds, args, error=f"exit {proc.returncode}: {' | '.join(tail)} ({log})")
    stamp_path.write_text(json.dumps({**stamp, "seconds": seconds}))
    return RunResult(spec, "ok", seconds, args, json.loads(summary_path.read_text()))


def prepare_data(cfg: Config) -> None:
    """Tokenize into the data cache here, once, instead of in the first runs at the same time."""
    from pipeline.data.dataset import build_split
    from pipeline.model.loading import load_tokenizer, model_config
    from pipeline.model.source import resolve_model_dir

    if cfg.data.cache_dir == "none":
        return
    model_dir = resolve_model_dir(cfg.model.path)
    tok = load_tokenizer(model_dir)
    context = getattr(model_config(model_dir), "max_position_embeddings", None)
    for split in ("train", "eval"):
        build_split(cfg.data, split, tok, cfg.train.seed, context)


def validate(specs: list[RunSpec], st: BenchSettings, base_yaml: Path) -> None:
    """Every run's config, before any run starts (a typo in --set fails here, not half an hour in)."""
    for spec in specs:
        load_config(base_yaml, [*st.overrides, *spec.overrides, f"output.dir={Path(st.out) / 'runs' / spec.name}"])


def run_all(
    specs: list[RunSpec], st: BenchSettings, base_yaml: Path, progress: Callable[[str], None], jobs: int
) -> dict[str, RunResult]:
    (Path(st.out) / "logs").mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(base_yaml.read_text())
    results: dict[str, RunResult] = {}
    with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(launch, spec, st, base_yaml, base): spec for spec in specs}
        for fut in cf.as_completed(futures):
            r = fut.result()
            results[r.spec.name] = r
            progress(f"{r.spec.name} {r.status}" + (f" ({r.seconds:.0f} s)" if r.seconds else ""))
    return {s.name: results[s.name] for s in specs}


# ------------------------------------------------------------------------------------- in-process


def _windows(cfg: Config) -> Any:
    """The eval windows the runs evaluate on."""
    from transformers import AutoTokenizer

    from pipeline.train.evaluation import eval_windows

    d = cfg.data
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    return eval_windows(d.eval, tok, d.eval_seq_len or d.seq_len, d.eval_max_tokens, d.format, d.text_field, d.packing)


def _oneshot_method(run_dir: Path, st: BenchSettings, windows: Any) -> list[dict[str, Any]]:
    """Masks from the one-shot scores at every sparsity and scope, on the pretrained model."""
    from safetensors.torch import load_file

    from pipeline.export.compact import load_run
    from pipeline.export.verify import load_masked_model
    from pipeline.pruning.pruner import decide_units
    from pipeline.train.evaluation import perplexity

    run = load_run(run_dir)
    s = run.structure
    scores = load_file(str(run_dir / "scores.safetensors"))
    heads, chans = scores["scores.heads"], scores["scores.channels"]
    model, masks = load_masked_model(run)
    rows = []
    for scope in st.scopes:
        for sparsity in st.sparsities:
            masks.set_units(torch.ones_like(heads, dtype=torch.bool), torch.ones_like(chans, dtype=torch.bool))
            keep_h, keep_c = decide_units(s, heads, chans, masks, sparsity, scope, run.cfg.pruning.max_layer_sparsity)
            masks.set_units(keep_h, keep_c)
            _loss, ppl = perplexity(model, windows)
            rows.append(
                {
                    "scope": scope,
                    "sparsity": sparsity,
                    "ppl": ppl,
                    "achieved_sparsity": masks.sparsity(),
                    "score_events": int(scores["scores.events"]),
                }
            )
    return rows


def oneshot_quality(
    runs: dict[str, RunResult], st: BenchSettings, windows: Any, progress: Callable[[str], None]
) -> dict[str, list[dict[str, Any]]]:
    """method -> rows of (scope, sparsity, ppl); methods in parallel (``jobs``), one model each."""
    todo = {
        r.spec.method: Path(st.out) / "runs" / name for name, r in runs.items() if r.spec.kind == "oneshot" and r.ok
    }
    out: dict[str, list[dict[str, Any]]] = {}
    with cf.ThreadPoolExecutor(max_workers=st.jobs) as pool:
        futures = {pool.submit(_oneshot_method, d, st, windows): m for m, d in todo.items()}
        for fut in cf.as_completed(futures):
            m = futures[fut]
            try:
                out[m] = fut.result()
                progress(f"one-shot {m} evaluated")
            except Exception as e:  # one bad model must not lose the other results
                out[m] = []
                progress(f"one-shot {m} failed: {e}")
    return {m: out[m] for m in todo}


def compact_method(st: BenchSettings) -> str:
    return "lora" if "lora" in st.methods else st.methods[0]


def _n_params(model: torch.nn.Module, skip: str = "") -> int:
    return sum(p.numel() for n, p in model.named_parameters() if not (skip and skip in n))


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token: 2 per weight of every linear layer (projections and LM head), plus the
    attention scores and their weighted sum, 4 x (query heads x head_dim) x the mean causal context
    (seq_len + 1) / 2 per layer. Pruned heads cut the latter too, which parameters do not show."""
    from pipeline.model.structure import decoder_layers

    linear = sum(2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    attn = sum(4 * layer.self_attn.q_proj.out_features * (seq_len + 1) / 2 for layer in decoder_layers(model))
    return linear + attn


def compact_speed(
    runs: dict[str, RunResult], st: BenchSettings, windows: Any, progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Export the lora runs (or the first method's) and time them against the dense model."""
    from transformers import AutoModelForCausalLM

    from pipeline.export.compact import export, load_run
    from pipeline.export.verify import forward_speed
    from pipeline.train.evaluation import perplexity

    method = compact_method(st)
    picked = [r for r in runs.values() if r.spec.kind == "prune" and r.spec.method == method and r.ok]
    out = Path(st.out) / "compact"
    dense = AutoModelForCausalLM.from_pretrained(st.model, dtype=torch.float32).eval()
    models: dict[str, torch.nn.Module] = {"dense": dense}
    rows: list[dict[str, Any]] = []
    for r in picked:
        key = f"{r.spec.scope}-{r.spec.sparsity:g}"
        res = export(
            load_run(Path(st.out) / "runs" / r.spec.name),
            out / r.spec.name,
            merge_into="dequantized",
            dtype=torch.float32,
            overwrite=True,
            log=lambda _msg: None,
        )
        model = AutoModelForCausalLM.from_pretrained(res.out_dir, trust_remote_code=not res.stock).eval()
        models[key] = model
        _loss, ppl = perplexity(model, windows)
        rows.append(
            {
                "key": key,
                "method": method,
                "scope": r.spec.scope,
                "sparsity": r.spec.sparsity,
                "stock": res.stock,
                "params": _n_params(model),
                "matmul_params": _n_params(model, skip="embed_tokens"),
                "flops_per_token": flops_per_token(model, windows.input_ids.shape[1]),
                "ppl_compact": ppl,
                "ppl_run": r.summary.get("eval_ppl_after"),
            }
        )
        progress(f"compact {key} exported and evaluated")
    x = windows.input_ids[: st.speed_batch].long()
    tps = forward_speed(models, x, warmup=2, repeats=st.speed_repeats)
    dense_params, dense_mm = _n_params(dense), _n_params(dense, skip="embed_tokens")
    dense_flops = flops_per_token(dense, x.shape[1])
    for row in rows:
        row.update(
            flops_ratio=row["flops_per_token"] / dense_flops,
            tokens_per_s=tps[row["key"]],
            dense_tokens_per_s=tps["dense"],
            speedup=tps[row["key"]] / tps["dense"],
            dense_params=dense_params,
            params_ratio=row["params"] / dense_params,
            matmul_params_ratio=row["matmul_params"] / dense_mm,
            tokens=x.numel(),
        )
    progress("compact models timed")
    return rows


# ------------------------------------------------------------------------------------- tables


def _perf(r: RunResult | None) -> dict[str, Any]:
    return (r.summary.get("perf") or {}) if r is not None and r.ok else {}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def quality_rows(
    runs: dict[str, RunResult], oneshot: dict[str, list[dict[str, Any]]], st: BenchSettings
) -> list[dict[str, Any]]:
    rows = []
    for r in runs.values():
        if r.spec.kind != "prune":
            continue
        one = next(
            (
                o
                for o in oneshot.get(r.spec.method, [])
                if o["scope"] == r.spec.scope and o["sparsity"] == r.spec.sparsity
            ),
            {},
        )
        s = r.summary
        rows.append(
            {
                "method": r.spec.method,
                "criterion": METHODS[r.spec.method][0],
                "base": r.spec.quantization,
                "scope": r.spec.scope,
                "sparsity": r.spec.sparsity,
                "run": r.spec.name,
                "ok": r.ok,
                "ppl_before": s.get("eval_ppl_before"),
                "ppl_oneshot": one.get("ppl"),
                "ppl_after": s.get("eval_ppl_after"),
                "achieved_sparsity": s.get("achieved_sparsity"),
                "kept_kv_heads_per_layer": s.get("kept_kv_heads_per_layer"),
                "kept_heads_per_layer": s.get("kept_heads_per_layer"),
                "kept_channels_per_layer": s.get("kept_channels_per_layer"),
            }
        )
    return rows


def dense_rows(runs: dict[str, RunResult]) -> dict[str, dict[str, Any]]:
    return {
        r.spec.quantization: {
            "run": r.spec.name,
            "ok": r.ok,
            "ppl_before": r.summary.get("eval_ppl_before"),
            "ppl_after": r.summary.get("eval_ppl_after"),
        }
        for r in runs.values()
        if r.spec.kind == "dense"
    }


def _reference_runs(runs: dict[str, RunResult], st: BenchSettings) -> list[RunResult]:
    """The pruning run of every method at the highest sparsity, first scope."""
    s, scope = max(st.sparsities), st.scopes[0]
    return [r for r in runs.values() if r.spec.kind == "prune" and r.spec.sparsity == s and r.spec.scope == scope]


def memory_rows(runs: dict[str, RunResult], st: BenchSettings) -> list[dict[str, Any]]:
    """Tensor memory of a step with scoring, per method, against plain LoRA on the same base."""
    rows = []
    plain = {r.spec.quantization: r for r in runs.values() if r.spec.kind == "dense"}
    for r in [*plain.values(), *_reference_runs(runs, st)]:
        mem = _perf(r).get("memory") or {}
        if not mem:
            continue
        kinds = mem.get("resident_by_kind_mb", {})
        bucket = kinds.get("reduce_bucket", 0.0)
        base_mem = (_perf(plain.get(r.spec.quantization)).get("memory")) or {}
        plain_peak = base_mem.get("step_peak_mb", 0.0) - base_mem.get("resident_by_kind_mb", {}).get(
            "reduce_bucket", 0.0
        )
        peak = mem["step_peak_mb"] - bucket
        rows.append(
            {
                "run": r.spec.name,
                "method": r.spec.method or "plain LoRA",
                "base": r.spec.quantization,
                "probe_step": mem["probe_step"],
                "scored": mem["probe_step_scored"],
                "method_note": mem["method"],
                "model_mb": kinds.get("model"),
                "optimizer_mb": kinds.get("optimizer"),
                "reduce_bucket_mb": bucket,
                "resident_mb": mem["resident_mb"],
                "transient_mb": mem["transient_mb"],
                "peak_no_bucket_mb": peak,
                "peak_mb": mem["step_peak_mb"],
                "vs_plain": _ratio(peak, plain_peak),
                "process_peak_rss_mb": r.summary.get("peak_memory_mb"),
            }
        )
    return rows


def overhead_rows(runs: dict[str, RunResult], pairs: list[tuple[RunSpec, RunSpec]], st: BenchSettings) -> list[dict]:
    """Step time of a pruning run that scores on every step against plain LoRA started at the same
    time, and what that makes of a whole quality run, where only the steps up to the last decision score."""
    rows = []
    reference = {r.spec.method: r for r in _reference_runs(runs, st)}
    for plain_spec, prune_spec in pairs:
        plain, prune = _perf(runs.get(plain_spec.name)), _perf(runs.get(prune_spec.name))
        if not plain or not prune:
            continue
        scored = _ratio(prune.get("scoring_step_s_median"), plain.get("step_s_median"))
        q = reference.get(prune_spec.method)
        frac = q.summary["score_events"] / q.summary["steps"] if q is not None else None
        rows.append(
            {
                "method": prune_spec.method,
                "base": prune_spec.quantization,
                "steps_timed": prune.get("steps_timed"),
                "plain_step_s": plain.get("step_s_median"),
                "scoring_step_s": prune.get("scoring_step_s_median"),
                "overhead_scored_step": scored,
                "score_s_per_event": prune.get("score_s_per_event"),
                "scored_fraction": frac,
                "overhead_run": 1 + frac * (scored - 1) if scored is not None and frac is not None else None,
            }
        )
    return rows


def communication(runs: dict[str, RunResult], st: BenchSettings, cfg: Config) -> dict[str, Any]:
    """Measured all-reduce payload per scoring event against the per-step gradient traffic."""
    from benchmarks.planner import Settings, ZeroSettings, load_model_spec, plan
    from pipeline.model.loading import resolve_dtype

    t = cfg.train
    rows = []
    for r in _reference_runs(runs, st):
        p = _perf(r)
        if not p:
            continue
        grad = t.grad_accum * p["trainable_params"] * p["trainable_bytes_per_param"]
        rows.append(
            {
                "run": r.spec.name,
                "method": r.spec.method,
                "base": r.spec.quantization,
                "allreduce_bytes_per_event": p.get("score_allreduce_bytes_per_event"),
                "grad_reduce_scatter_bytes_per_step": grad,
                "ratio": _ratio(p.get("score_allreduce_bytes_per_event"), grad),
            }
        )
    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[resolve_dtype(cfg.model.dtype)]
    planned = {}
    for q in sorted({METHODS[m][1] for m in st.methods}):
        pl = plan(
            load_model_spec(st.model),
            Settings(
                nodes=1,
                gpus_per_node=st.comm_world,
                seq_len=cfg.data.seq_len,
                micro_batch=t.micro_batch_size,
                grad_accum=t.grad_accum,
                lora_r=cfg.lora.r,
                target_modules=tuple(cfg.lora.target_modules),
                dtype=dtype,
                quantization=q,
                double_quant=cfg.model.double_quant,
                gradient_checkpointing=t.gradient_checkpointing,
                zero=ZeroSettings.from_ds_config(cfg.deepspeed.config),
            ),
        )
        planned[q] = {
            "per_step_per_rank_bytes": next(c[3] for c in pl.comm if c[0] == "optimizer step"),
            "lora_scoring_gathers_per_rank_bytes": sum(
                c[3] for c in pl.comm if c[0] == "scoring event" and "all-gather" in c[1]
            ),
        }
    return {"rows": rows, "planned_world": st.comm_world, "planned": planned}


# ------------------------------------------------------------------------------------- entry point


def run_bench(st: BenchSettings, command: str, progress_bar: bool = True) -> dict[str, Any]:
    """Run everything, write results.json, report.md and the plots into ``st.out``; returns the results."""
    from tqdm.auto import tqdm

    from benchmarks import report as bench_report

    st.check()
    out = Path(st.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    specs, pairs = plan_runs(st), speed_pairs(st)
    n_oneshot = sum(s.kind == "oneshot" for s in specs)
    n_compact = sum(s.kind == "prune" and s.method == compact_method(st) for s in specs)
    total = len(specs) + 2 * len(pairs) + n_oneshot + n_compact + 1
    bar = tqdm(total=total, desc="bench", unit="task", disable=not progress_bar)

    def progress(msg: str) -> None:
        bar.set_postfix_str(msg[:60], refresh=False)
        bar.update(1)

    wall: dict[str, float] = {}
    base_yaml = out / "base.yaml"
    base_yaml.write_text(yaml.safe_dump(base_config(st), sort_keys=False))
    cfg = load_config(base_yaml, list(st.overrides))  # what every run shares
    validate([*specs, *(s for pair in pairs for s in pair)], st, base_yaml)
    try:
        prepare_data(cfg)
        wall["data_s"] = time.perf_counter() - t_start
        runs = run_all(specs, st, base_yaml, progress, st.jobs)
        wall["runs_s"] = time.perf_counter() - t_start - wall["data_s"]
        t0 = time.perf_counter()
        for pair in pairs:  # one pair at a time, its two runs together
            runs |= run_all(list(pair), st, base_yaml, progress, min(2, st.jobs))
        wall["speed_runs_s"] = time.perf_counter() - t0
        torch.set_num_threads(st.threads)
        windows = _windows(cfg)
        t0 = time.perf_counter()
        oneshot = oneshot_quality(runs, st, windows, progress)
        wall["oneshot_eval_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        compact = compact_speed(runs, st, windows, progress)
        wall["compact_s"] = time.perf_counter() - t0
    finally:
        bar.close()
    results = {
        "command": command,
        "settings": asdict(st),
        "base_config": cfg.to_dict(),
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
        "runs": {
            name: {
                "kind": r.spec.kind,
                "method": r.spec.method,
                "scope": r.spec.scope,
                "sparsity": r.spec.sparsity,
                "base": r.spec.quantization,
                "status": r.status,
                "seconds": r.seconds,
                "args": r.args,
                "error": r.error,
                "summary": r.summary,
            }
            for name, r in runs.items()
        },
        "dense": dense_rows(runs),
        "quality": quality_rows(runs, oneshot, st),
        "oneshot": oneshot,
        "memory": memory_rows(runs, st),
        "overhead": overhead_rows(runs, pairs, st),
        "compact": compact,
        "communication": communication(runs, st, cfg),
        "failed": [name for name, r in runs.items() if not r.ok],
    }
    wall["total_s"] = time.perf_counter() - t_start
    results["wall"] = wall
    (out / "results.json").write_text(json.dumps(results, indent=1))
    bench_report.write_report(results, out)
    return results
