"""Check a run's config, model directory, data files and DeepSpeed JSON without loading any weights.

lora-prune validate CONFIG.yaml [dotted.key=value ...]
python -m pipeline validate CONFIG.yaml [dotted.key=value ...]

Prints one message listing every problem (the key or file and the fix) and exits 2, or "ok" and a
short summary and exits 0. pipeline/cli/train.py runs the same checks before distributed start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

from pipeline.config.schema import Config, load_config
from pipeline.errors import ConfigError, InputError


def _model_problems(cfg: Config) -> tuple[list[str], str]:
    """Problems with model.path and the pruning settings it must support; and a one-line summary."""
    from pipeline.model.source import classify
    from pipeline.pruning.pruner import check_reachable, check_width_rules

    try:
        src = classify(cfg.model.path)
    except InputError as e:
        return [str(e)], ""
    if src.kind == "gguf":  # converted on first use (tools/gguf_to_hf.py); its dimensions are read then
        return [], f"model {cfg.model.path} (GGUF, converted at start-up)"
    from transformers import AutoConfig

    from pipeline.model.structure import structure_from_config

    try:
        conf = AutoConfig.from_pretrained(src.path)
    except (OSError, ValueError, KeyError) as e:
        return [f"model.path={cfg.model.path}: transformers cannot read its config.json ({e})"], ""
    problems: list[str] = []
    try:
        s = structure_from_config(conf, cfg.pruning.head_unit)
    except InputError as e:
        return [f"model.path={cfg.model.path}: {e}"], ""
    for check in (check_reachable, check_width_rules):
        try:
            check(s, cfg.pruning)
        except InputError as e:
            problems.append(str(e))
    summary = (
        f"model {cfg.model.path}: {s.model_type}, {s.num_layers} layers, {s.num_heads} heads / {s.num_kv_heads} KV, "
        f"head_dim {s.head_dim}, {s.intermediate_size} MLP channels"
    )
    return problems, summary


def _tokenizer_stub(cfg: Config) -> object:
    """What format detection reads from the tokenizer (its chat template), from tokenizer_config.json."""
    try:
        tc = json.loads((Path(cfg.model.path) / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        tc = {}
    has_template = (Path(cfg.model.path) / "chat_template.jinja").is_file()
    return types.SimpleNamespace(chat_template=tc.get("chat_template") or has_template or None)


def _data_problems(cfg: Config) -> tuple[list[str], list[str]]:
    from pipeline.data.dataset import _nonempty, _read, _resolve_format

    problems, summary = [], []
    tok = _tokenizer_stub(cfg)
    for src in cfg.data.sources("train") + cfg.data.sources("eval"):
        try:
            ds, plain = _read(src.path, src.key)
            if not plain:
                _nonempty(ds, src.key, src.path)
            elif not any(ds["text"]):
                raise InputError(f"{src.key}={src.path}: the file is empty; give it some text")
            summary.append(f"{src.key}={src.path} ({_resolve_format(ds, src, plain, tok)}, {len(ds)} records)")
        except InputError as e:
            problems.append(str(e))
    return problems, summary


def _deepspeed_problems(cfg: Config) -> list[str]:
    from pipeline.config.ds_config import resolve

    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        d = resolve(cfg, world)
    except InputError as e:
        return [str(e)]
    except RuntimeError as e:  # e.g. model.dtype fp16/bf16 without a GPU
        return [f"deepspeed.config={cfg.deepspeed.config}: {e}"]
    del d
    return []


def check(config: str, overrides: list[str]) -> list[str]:
    """The run's summary lines; raises ConfigError listing every problem found."""
    problems: list[str] = []
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        problems.append(str(e))
        # The files are still checked: read what parses of the config with the schema rules off.
        cfg = _lenient(config, overrides)
        if cfg is None:
            raise
    model, model_summary = _model_problems(cfg) if cfg.model.path else ([], "")
    data, data_summary = _data_problems(cfg)
    problems += model + data + _deepspeed_problems(cfg)
    if problems:
        raise ConfigError(f"{len(problems)} problem group(s) in {config}:\n" + "\n".join(f"* {p}" for p in problems))
    return [model_summary, *data_summary, f"deepspeed {cfg.deepspeed.config}", f"output {cfg.output.dir}"]


def _lenient(config: str, overrides: list[str]) -> Config | None:
    """The config with every well-typed known key applied and no value rules (for the file checks)."""
    import yaml

    from pipeline.config import schema

    try:
        data = yaml.safe_load(Path(config).read_text()) or {}
        data = schema._merge(data, schema.parse_overrides(overrides)) if isinstance(data, dict) else None
    except (OSError, yaml.YAMLError, ConfigError):
        return None
    if data is None:
        return None
    cfg = Config()
    schema._apply(cfg, data, "", [])
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML run config")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    args = ap.parse_args(argv)
    try:
        summary = check(args.config, args.overrides)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("ok\n  " + "\n  ".join(line for line in summary if line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
