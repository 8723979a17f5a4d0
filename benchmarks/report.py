"""``report.md`` and the PNG plots of a benchmark (``benchmarks/bench.py``), from its ``results.json``;
and ``widths.png``, the kept widths per layer of one run (written by the run next to summary.json)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

QUALITY_PNG = "quality.png"
LAYERS_PNG = "layers.png"
WIDTHS_PNG = "widths.png"
# One colour and marker per criterion, the same in every panel (Okabe-Ito colours: colour-blind safe).
_STYLES = (
    ("#0072B2", "o"),
    ("#D55E00", "s"),
    ("#009E73", "^"),
    ("#CC79A7", "D"),
    ("#E69F00", "v"),
    ("#56B4E9", "P"),
    ("#000000", "X"),
    ("#F0E442", "*"),
)
MB = 2**20


def _f(x: Any, spec: str = ".2f", suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    return f"{x:{spec}}{suffix}"


def _bytes(x: float | None) -> str:
    if x is None:
        return "n/a"
    for unit, div in (("GiB", 2**30), ("MiB", MB), ("KiB", 2**10)):
        if x >= div:
            return f"{x / div:.2f} {unit}"
    return f"{x:.0f} B"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


def _methods(results: dict[str, Any]) -> list[str]:
    return list(results["settings"]["methods"])


def _base(q: str) -> str:
    return "NF4 base" if q == "nf4" else "fp32 base"


def _label(method: str, base: str) -> str:
    return f"`{method}`" + (" (fp32 base)" if base == "none" and method != "full_grad" else "")


def _quality_section(results: dict[str, Any]) -> list[str]:
    st, base = results["settings"], results["base_config"]
    d, dense = base["data"], results["dense"]
    rows = results["quality"]
    sparsities = sorted(st["sparsities"])
    lines = [
        "## Quality",
        "",
        f"Perplexity on `{Path(st['eval']).name}` (first {d['eval_max_tokens']:,} tokens, windows of "
        f"{d['eval_seq_len'] or d['seq_len']}). Dense model before pruning: "
        + ", ".join(f"{_f(v['ppl_before'])} ({'NF4' if q == 'nf4' else 'fp32'} base)" for q, v in dense.items())
        + ". Dense LoRA fine-tuning, nothing pruned (the ceiling): "
        + ", ".join(f"{_f(v['ppl_after'])} ({'NF4' if q == 'nf4' else 'fp32'} base)" for q, v in dense.items())
        + ".",
        "",
        f"*one-shot*: masks at the target from {st['calib_steps']} scoring steps on the pretrained model "
        "(adapters at their initialisation), evaluated with no training. *after*: pruning while "
        f"fine-tuning, {st['steps']} steps (cubic schedule, warm-up {base['pruning']['warmup']}, "
        f"cool-down {base['pruning']['cooldown']}). Lowest *after* per column in bold.",
        "",
    ]
    for scope in st["scopes"]:
        header = ["criterion"] + [f"{s:g} {k}" for s in sparsities for k in ("one-shot", "after")]
        best = {}
        for s in sparsities:
            vals = [r["ppl_after"] for r in rows if r["scope"] == scope and r["sparsity"] == s and r["ppl_after"]]
            best[s] = min(vals) if vals else None
        body = []
        for m in _methods(results):
            if not any(r["method"] == m and r["scope"] == scope for r in rows):
                continue  # a control run in the first scope only
            cells = [_label(m, next((r["base"] for r in rows if r["method"] == m), "nf4"))]
            for s in sparsities:
                r = next((r for r in rows if r["method"] == m and r["scope"] == scope and r["sparsity"] == s), None)
                if r is None or not r["ok"]:
                    cells += ["failed", "failed"]
                    continue
                after = _f(r["ppl_after"])
                cells += [_f(r["ppl_oneshot"]), f"**{after}**" if r["ppl_after"] == best[s] else after]
            body.append(cells)
        lines += [f"### `{scope}` scope", "", *_table(header, body), ""]
    lines += [f"![perplexity vs sparsity]({QUALITY_PNG})", ""]
    return lines


def _layers_section(results: dict[str, Any]) -> list[str]:
    st = results["settings"]
    s, scope = max(st["sparsities"]), st["scopes"][0]
    rows = [r for r in results["quality"] if r["sparsity"] == s and r["scope"] == scope and r["ok"]]
    if not rows:
        return []
    body = [
        [
            _label(r["method"], r["base"]),
            ", ".join(map(str, r["kept_kv_heads_per_layer"])),
            ", ".join(map(str, r["kept_heads_per_layer"])),
            ", ".join(map(str, r["kept_channels_per_layer"])),
        ]
        for r in rows
    ]
    return [
        f"### What is kept, per layer ({s:g}, `{scope}` scope, after fine-tuning)",
        "",
        *_table(["criterion", "KV heads", "query heads", "MLP channels"], body),
        "",
        f"![kept heads and channels per layer]({LAYERS_PNG})",
        "",
    ]


def _memory_section(results: dict[str, Any]) -> list[str]:
    rows = results["memory"]
    if not rows:
        return []
    by = {(r["method"], r["base"]): r for r in rows}
    body = [
        [
            _label(r["method"], r["base"]) if r["method"] != "plain LoRA" else "plain LoRA",
            "NF4" if r["base"] == "nf4" else "fp32",
            _f(r["model_mb"], ".1f"),
            _f(r["optimizer_mb"], ".1f"),
            _f(r["reduce_bucket_mb"], ".0f"),
            _f(r["transient_mb"], ".1f"),
            _f(r["peak_no_bucket_mb"], ".1f"),
            _f(r["vs_plain"], ".3f"),
            _f(r["process_peak_rss_mb"], ".0f"),
        ]
        for r in rows
    ]
    lines = [
        "## Memory",
        "",
        f"One training step with a scoring event (step {rows[0]['probe_step']}; plain LoRA: the same step "
        "without one), at the highest sparsity. *Resident*: storages the model (weights, ZeRO-3 partitions, "
        "NF4 quant state) and the optimizer (fp32 master, gradient partition, Adam moments) hold at the start "
        "of the step; DeepSpeed's reduce bucket (`reduce_bucket_size` elements, allocated whole whatever the "
        "model size) is shown apart and left out of the peak. *Transient*: peak of the tensor storages created "
        "during the step (forward and backward of every micro-batch, scoring, optimizer step) and alive at "
        f"once ({'CUDA allocator statistics' if 'CUDA' in rows[0]['method_note'] else 'counted on CPU'}). "
        "Process RSS is the whole process's peak resident set: coarse (libraries, data, and as much of the "
        "bucket as the OS has backed with pages).",
        "",
        *_table(
            [
                "criterion",
                "base",
                "model MiB",
                "optimizer MiB",
                "reduce bucket MiB",
                "transient MiB",
                "step peak MiB (no bucket)",
                "vs plain LoRA, same base",
                "process peak RSS MiB",
            ],
            body,
        ),
        "",
    ]
    ratios = []
    full = by.get(("full_grad", "none"))
    for key, what in ((("lora", "nf4"), "`lora` (NF4 base)"), (("lora_fp32", "none"), "`lora` (fp32 base)")):
        r = by.get(key)
        if r and full:
            ratios.append(
                f"{what} / `full_grad`: step peak x{r['peak_no_bucket_mb'] / full['peak_no_bucket_mb']:.3f}, "
                f"transient x{r['transient_mb'] / full['transient_mb']:.3f}"
            )
    if ratios:
        lines += ["Ratios: " + "; ".join(ratios) + ".", ""]
    return lines


def _speed_section(results: dict[str, Any]) -> list[str]:
    st = results["settings"]
    lines = ["## Speed", ""]
    rows = results["overhead"]
    if rows:
        body = [
            [
                _label(r["method"], r["base"]),
                _f(r["plain_step_s"], ".3f"),
                _f(r["scoring_step_s"], ".3f"),
                f"**x{_f(r['overhead_scored_step'], '.3f')}**",
                _f(r["score_s_per_event"], ".4f"),
                _f(r["scored_fraction"], ".0%"),
                f"x{_f(r['overhead_run'], '.3f')}",
            ]
            for r in rows
        ]
        lines += [
            "### Pruning overhead: training step time against plain LoRA (same engine, batch and base)",
            "",
            f"Each pruning run is started together with a plain LoRA run on the same base ({st['speed_steps']} "
            "steps each, no evaluation; the pruning run scores on every step), so that both see the same machine "
            "load; medians over the steps after the first and the memory probe. A quality run scores only up "
            "to its last decision; after that a step costs what a plain LoRA step costs (masked units are "
            "multiplied by 0, not skipped), so its overhead is `1 + scored fraction x (ratio - 1)`. "
            "`full_grad` also does work outside the scoring call: the weight-gradient products in backward.",
            "",
            *_table(
                [
                    "criterion",
                    "plain LoRA step s",
                    "step s, scoring",
                    "ratio per scored step",
                    "scoring call s",
                    "steps scored in a quality run",
                    "ratio over a quality run",
                ],
                body,
            ),
            "",
        ]
    rows = results["compact"]
    if rows:
        r0 = rows[0]
        body = [
            [
                f"{r['sparsity']:g}",
                f"`{r['scope']}`" + (" (stock)" if r["stock"] else " (per-layer)"),
                f"{r['params']:,} ({r['params_ratio']:.1%})",
                f"{r['flops_ratio']:.1%}",
                f"x{1 / r['params_ratio']:.2f} / x{1 / r['flops_ratio']:.2f}",
                _f(r["tokens_per_s"], ".0f"),
                f"**x{r['speedup']:.2f}**",
                f"{_f(r['ppl_compact'])} / {_f(r['ppl_run'])}",
            ]
            for r in rows
        ]
        lines += [
            "### Compact model forward speed",
            "",
            f"`{r0['method']}` runs exported by `pipeline/export/compact.py` (merged into the dequantized base, fp32), "
            f"forward tokens/s on {r0['tokens']:,} tokens ({st['speed_batch']} windows), median of "
            f"{st['speed_repeats']} forwards interleaved with the dense model's ({r0['dense_params']:,} parameters, "
            f"{_f(r0['dense_tokens_per_s'], '.0f')} tokens/s) on {st['threads']} thread(s). FLOPs per token: 2 per "
            "weight of every linear layer (LM head included) plus the attention scores and weighted sum over the "
            "mean causal context, which pruned heads also remove. *Ideal*: the speedup if time were proportional "
            "to parameters / to FLOPs.",
            "",
            *_table(
                [
                    "sparsity",
                    "scope",
                    "parameters (of dense)",
                    "FLOPs/token (of dense)",
                    "ideal: params / FLOPs",
                    "tokens/s",
                    "speedup",
                    "ppl compact / run",
                ],
                body,
            ),
            "",
        ]
    return lines


def _comm_section(results: dict[str, Any]) -> list[str]:
    c = results["communication"]
    if not c["rows"]:
        return []
    body = [
        [
            _label(r["method"], r["base"]),
            _bytes(r["allreduce_bytes_per_event"]),
            _bytes(r["grad_reduce_scatter_bytes_per_step"]),
            _f(r["ratio"], ".3f"),
        ]
        for r in c["rows"]
    ]
    planned = "; ".join(
        f"{'NF4' if q == 'nf4' else 'fp32'} base: {_bytes(p['per_step_per_rank_bytes'])} per optimizer step, "
        f"`lora` scoring gathers {_bytes(p['lora_scoring_gathers_per_rank_bytes'])} per event"
        for q, p in c["planned"].items()
    )
    t = results["base_config"]["train"]
    return [
        "## Communication",
        "",
        "All-reduce payload per scoring event, counted in `pipeline/dist/comm.py` (what each rank hands to "
        "all-reduce; a ring all-reduce moves about twice that per rank), against the gradient traffic of one "
        f"optimizer step: ZeRO-3 reduce-scatters the LoRA gradients every micro-batch, `grad_accum ({t['grad_accum']})"
        " x trainable parameters x bytes per gradient element`.",
        "",
        *_table(["criterion", "all-reduced per scoring event", "gradient reduce-scatter per step", "ratio"], body),
        "",
        f"Planned per-rank traffic at {c['planned_world']} ranks (`benchmarks/planner.py`: ZeRO-3 all-gathers of "
        f"non-persistent parameters in forward and backward plus the reduce-scatter): {planned}.",
        "",
    ]


def _runs_section(results: dict[str, Any]) -> list[str]:
    n_set = len(results["settings"]["overrides"])
    body = [
        [f"`{name}`", r["status"], _f(r["seconds"], ".0f"), " ".join(f"`{a}`" for a in r["args"][n_set:-1])]
        for name, r in results["runs"].items()
    ]
    reused = sum(r["status"] == "reused" for r in results["runs"].values())
    lines = ["## Runs", ""]
    if reused:
        lines += [f"{reused} run(s) reused from an earlier invocation with the same settings (seconds: as then).", ""]
    lines += [*_table(["run", "status", "seconds", "overrides (after `--set`)"], body), ""]
    for name in results["failed"]:
        lines.append(f"- `{name}` failed: {results['runs'][name]['error']}")
    return lines


def write_report(results: dict[str, Any], out: Path) -> None:
    st, base, wall = results["settings"], results["base_config"], results["wall"]
    t, d = base["train"], base["data"]
    env = results["environment"]
    lines = [
        f"# Benchmark: `{Path(st['model']).name}`",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Model `{st['model']}`, training text `{st['train']}`, seed {st['seed']}. Every run: one process, "
        f"DeepSpeed ZeRO-3 (`{Path(st['ds_config']).name}`), {st['steps']} steps of "
        f"{t['micro_batch_size']} x {t['grad_accum']} windows of {d['seq_len']} tokens, LoRA r={base['lora']['r']} "
        f"on all projections, AdamW lr {t['lr']} (min_lr_ratio {t['min_lr_ratio']}), {st['threads']} thread(s), "
        f"{st['jobs']} run(s) at a time on {env['cpus']} CPU(s){' with CUDA' if env['cuda'] else ''}; torch "
        f"{env['torch']}. Wall time {wall['total_s'] / 60:.1f} min (runs {wall['runs_s'] / 60:.1f} min).",
        "",
    ]
    lines += _quality_section(results)
    lines += _layers_section(results)
    lines += _memory_section(results)
    lines += _speed_section(results)
    lines += _comm_section(results)
    lines += _runs_section(results)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot_quality(results, out / QUALITY_PNG)
    plot_layers(results, out / LAYERS_PNG)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_quality(results: dict[str, Any], path: Path) -> None:
    """Perplexity against sparsity, one panel per scope: after fine-tuning (solid) and one-shot (dashed,
    hollow markers) per criterion, each with its own colour and marker; the dense LoRA ceiling once.
    The y range is that of the after-fine-tuning values, where the criteria differ; a one-shot value
    above it is drawn as a hollow triangle on the top edge with its value. Criteria with near-equal
    perplexity are drawn side by side (a small horizontal offset each) so that none hides another."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    st, rows = results["settings"], results["quality"]
    scopes, methods = st["scopes"], [m for m in _methods(results) if any(r["method"] == m for r in rows)]
    sparsities = sorted(st["sparsities"])
    span = (sparsities[-1] - sparsities[0]) or 1.0
    dense = results["dense"]
    ceiling_q = "nf4" if dense.get("nf4", {}).get("ppl_after") else next(iter(dense), None)
    ceiling = dense[ceiling_q]["ppl_after"] if ceiling_q else None
    ok = [r for r in rows if r["ok"] and r["ppl_after"]]
    after_all = [r["ppl_after"] for r in ok]
    lo = min([*after_all, ceiling or math.inf]) if after_all else 1.0
    hi = max(after_all) if after_all else 2.0
    top = hi + 0.12 * (hi - lo)
    fig, axes = plt.subplots(1, len(scopes), figsize=(6.5 * len(scopes), 6.5), squeeze=False, sharey=True)
    stacked: dict[tuple[str, float], list[int]] = {}  # off-scale labels per panel and sparsity
    for ax, scope in zip(axes[0], scopes, strict=True):
        for i, m in enumerate(methods):
            color, marker = _STYLES[i % len(_STYLES)]
            pts = sorted((r["sparsity"], r) for r in ok if r["method"] == m and r["scope"] == scope)
            if not pts:
                continue
            dx = (i - (len(methods) - 1) / 2) * 0.02 * span
            xs = [x + dx for x, _ in pts]
            ax.plot(xs, [r["ppl_after"] for _, r in pts], "-", color=color, marker=marker, ms=7, lw=1.8, zorder=3)
            one = [(x, r["ppl_oneshot"], sp) for x, (sp, r) in zip(xs, pts, strict=True) if r["ppl_oneshot"]]
            if one:
                ox, oy = [o[0] for o in one], [o[1] for o in one]
                ax.plot(ox, oy, "--", color=color, marker=marker, ms=6, lw=1, mfc="white", alpha=0.8)
                for x, v, sp in one:
                    if v > top:  # off the scale: mark it on the edge, its value stacked above (one row each)
                        k = stacked.setdefault((scope, sp), [0])
                        ax.plot([x], [top], marker="^", color=color, mfc="white", ms=7, clip_on=False)
                        ax.annotate(
                            f"{m} {v:.0f}",
                            (sp, top),
                            xytext=(0, 8 + 10 * k[0]),
                            textcoords="offset points",
                            ha="center",
                            fontsize=7,
                            color=color,
                        )
                        k[0] += 1
        if ceiling:
            ax.axhline(ceiling, color="grey", ls=":", lw=1.5, zorder=1)
        ax.set_title(f"{scope} scope")
        ax.set_xticks(sparsities)
        ax.set_xlim(sparsities[0] - 0.15 * span, sparsities[-1] + 0.15 * span)
        ax.set_ylim(lo - 0.04 * (hi - lo), top)
        ax.set_xlabel("target sparsity (fraction of prunable parameters removed)")
        ax.grid(True, alpha=0.3)
    rows_above = max([k[0] for k in stacked.values()] or [0])
    for ax in axes[0]:  # room for the off-scale labels, the same in every panel
        ax.set_title(ax.get_title(), pad=12 + 10 * rows_above)
    axes[0][0].set_ylabel("held-out perplexity")
    handles = [
        Line2D([], [], color=_STYLES[i % len(_STYLES)][0], marker=_STYLES[i % len(_STYLES)][1], ls="-", label=m)
        for i, m in enumerate(methods)
    ]
    handles += [
        Line2D([], [], color="black", ls="-", marker="o", label="after fine-tuning"),
        Line2D([], [], color="black", ls="--", marker="o", mfc="white", label="one-shot (no training)"),
        Line2D([], [], color="black", ls="", marker="^", mfc="white", label="one-shot above the scale (value)"),
    ]
    if ceiling:
        others = [f"{_base(q)} {_f(v['ppl_after'])}" for q, v in dense.items() if q != ceiling_q and v["ppl_after"]]
        extra = f"; {', '.join(others)}" if others else ""
        label = f"dense LoRA, nothing pruned: {_f(ceiling)}\n({_base(ceiling_q)}{extra})"
        handles.append(Line2D([], [], color="grey", ls=":", lw=1.5, label=label))
    # Below the panels, inside the figure: nothing of the data is covered.
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8, frameon=False)
    fig.suptitle(f"{Path(st['model']).name}: held-out perplexity, {st['steps']} steps of pruning while fine-tuning")
    fig.tight_layout(rect=(0, 0.11, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_layers(results: dict[str, Any], path: Path) -> None:
    """Heatmaps of the kept fraction of KV heads and MLP channels per layer (highest sparsity, first scope)."""
    plt = _pyplot()
    st = results["settings"]
    s, scope = max(st["sparsities"]), st["scopes"][0]
    rows = [r for r in results["quality"] if r["sparsity"] == s and r["scope"] == scope and r["ok"]]
    structure = next((r["summary"]["structure"] for r in results["runs"].values() if r["summary"]), None)
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * max(len(rows), 1) + 2), squeeze=False)
    if rows and structure:
        names = [r["method"] + (" (fp32)" if r["base"] == "none" and r["method"] != "full_grad" else "") for r in rows]
        for ax, key, total, title in (
            (axes[0][0], "kept_kv_heads_per_layer", structure["num_key_value_heads"], "KV heads kept"),
            (axes[0][1], "kept_channels_per_layer", structure["intermediate_size"], "MLP channels kept"),
        ):
            counts = [r[key] for r in rows]
            frac = [[c / total for c in row] for row in counts]
            im = ax.imshow(frac, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for i, row in enumerate(counts):
                for j, c in enumerate(row):
                    ax.text(j, i, str(c), ha="center", va="center", fontsize=7, color="w" if frac[i][j] < 0.6 else "k")
            ax.set_xticks(range(len(counts[0])))
            ax.set_xlabel("layer")
            ax.set_yticks(range(len(names)))
            ax.set_yticklabels(names)
            ax.set_title(f"{title} (of {total})")
            fig.colorbar(im, ax=ax, fraction=0.046, label="fraction kept")
    fig.suptitle(f"{Path(st['model']).name}: kept per layer at {s:g} ({scope} scope, after fine-tuning)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_widths(summary: dict[str, Any], path: Path) -> None:
    """One run's kept widths per layer: query heads, KV heads and MLP channels, each as kept (coloured)
    against the original width (grey), with the kept count written on the bar."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    s = summary["structure"]
    kinds = (
        ("kept_heads_per_layer", s["num_attention_heads"], "query heads"),
        ("kept_kv_heads_per_layer", s["num_key_value_heads"], "KV heads"),
        ("kept_channels_per_layer", s["intermediate_size"], "MLP channels"),
    )
    n = len(summary["kept_heads_per_layer"])
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 0.32 * n + 2.5), 7.5), sharex=True)
    for ax, (key, total, name), (color, _) in zip(axes, kinds, _STYLES, strict=False):
        kept = summary[key]
        layers = list(range(n))
        ax.bar(layers, [total] * n, color="#dddddd", width=0.8, label="original")
        ax.bar(layers, kept, color=color, width=0.8, label="kept")
        if n <= 48:  # counts stay legible up to about this many layers
            for x, k in zip(layers, kept, strict=True):
                ax.text(x, k, str(k), ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, total * 1.15)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{name}\n(of {total})")
        ax.margins(x=0.01)
    axes[0].legend(loc="upper right", fontsize=8, ncol=2, framealpha=0.9)
    axes[-1].set_xlabel("layer")
    axes[-1].set_xticks(range(0, n, max(1, n // 24)))
    title = (
        f"{Path(str(summary.get('model_path', ''))).name}: {summary.get('criterion')} / {summary.get('scope')}, "
        f"sparsity {_f(summary.get('achieved_sparsity'), '.3f')} of prunable parameters "
        f"(target {_f(summary.get('target_sparsity'), 'g')})"
    )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rewrite(out: Path) -> None:
    """Regenerate report.md and the plots from ``out/results.json``."""
    write_report(json.loads((out / "results.json").read_text()), out)
