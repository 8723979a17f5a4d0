"""The training loop: ZeRO-3 LoRA fine-tuning with scoring and masking in between."""

from __future__ import annotations

import dataclasses
import math
import random
import signal
import time
from pathlib import Path
from typing import Any

import deepspeed
import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from benchmarks.report import WIDTHS_PNG, plot_widths
from pipeline import __version__
from pipeline.config.ds_config import resolve
from pipeline.config.schema import Config, save_config
from pipeline.data.dataset import TrainBatches, Windows, eval_batches, load_split, n_targets
from pipeline.dist import comm as D
from pipeline.model.fingerprint import run_fingerprints
from pipeline.model.loading import dtype_name, load_model, load_tokenizer, model_config, resolve_dtype
from pipeline.model.source import ModelError, resolve_model_dir, source_record
from pipeline.model.structure import check_layout, discover, structure_from_config
from pipeline.pruning.masks import Masks
from pipeline.pruning.pruner import Pruner, check_lora_coverage, check_reachable, check_width_rules, width_rules
from pipeline.pruning.rank_pruning import RankPruner
from pipeline.train.checkpoint import (
    CHECKPOINTS,
    RUN_CONFIG,
    TENSORS,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
    save_run,
    start_fresh,
    supersede_after,
    write_summary,
)
from pipeline.train.distill import Distiller, load_teacher
from pipeline.train.evaluation import lm_eval_task_manager, run_lm_eval
from pipeline.train.faults import Faults
from pipeline.train.logs import RunLogger, info, peak_memory_mb
from pipeline.train.perf import StepPerf
from pipeline.train.rundir import OutputLock, prepare_output, promote
from pipeline.train.shrink import ShrinkHistory, apply_history, materialize, plan_keeps, shrink_engine
from pipeline.train.stops import AFTER_LOOP, EXIT_PREEMPTED, STOP_SIGNALS, RunStopped, stop_outside_the_loop

EXIT_BAD_STEPS = 3


class StopRequest:
    """SIGTERM (Slurm's time limit, preemption) or SIGINT (Ctrl-C) only sets a flag: the ranks agree on
    it at the next step's all-reduce, save a checkpoint together and exit, instead of dying mid-collective."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = signal.Signals(signum).name

    def close(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def evaluate(engine: Any, blocks: Windows | None, micro_batch: int) -> tuple[float, float]:
    """Mean NLL per target token and perplexity over the eval windows (all ranks; forwards are
    collective), as pipeline/evaluation.perplexity computes them for plain models."""
    if blocks is None:
        return math.nan, math.nan
    engine.eval()
    dev = D.device()
    acc = torch.zeros(2, dtype=torch.float64, device=D.comm_device())
    for batch, real in eval_batches(blocks, micro_batch, D.world_size(), D.rank()):
        batch = {k: v.to(dev) for k, v in batch.items()}
        # No KV cache: with one, transformers ignores the packed documents' position_ids in the mask.
        loss = engine(**batch, use_cache=False).loss
        n = n_targets(batch["labels"])
        if real and n:
            acc += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=acc.device)
    engine.train()
    D.all_reduce_sum(acc)
    mean = (acc[0] / acc[1]).item()
    return mean, math.exp(min(mean, 50.0))


class Trainer:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        ev = cfg.eval  # unknown lm-eval task names stop the run here, before start-up and loading
        self.lm_eval_tm = lm_eval_task_manager(ev.lm_eval_tasks, ev.lm_eval_include_path) if ev.lm_eval_tasks else None
        Faults(0)  # a malformed PIPELINE_FAULTS is refused before start-up
        D.init()
        # Rank 0 holds output.dir's lock from here to exit; work is where this run writes (see rundir.py).
        self.work, self.lock = prepare_output(cfg)
        try:
            self._start(cfg)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release output.dir (rank 0); called on every exit, also after a failed start."""
        lock: OutputLock | None = getattr(self, "lock", None)
        if lock is not None:
            lock.release()
            self.lock = None

    def _start(self, cfg: Config) -> None:
        # Cheap checks before any heavy work: the model structure and the data.
        # model.path may be a GGUF file or a cached repo id; everything below reads one local directory.
        self.model_dir = resolve_model_dir(cfg.model.path)
        base_config = model_config(self.model_dir)
        structure = structure_from_config(base_config, cfg.pruning.head_unit)
        check_reachable(structure, cfg.pruning)
        check_width_rules(structure, cfg.pruning)
        check_layout(base_config)
        check_lora_coverage(cfg.pruning.criterion, {m.rsplit(".", 1)[-1] for m in cfg.lora.target_modules})
        self.teacher_dir = self._check_teacher(base_config)
        self.ds_config = resolve(cfg, D.world_size())
        self.fingerprints = run_fingerprints(self.model_dir, cfg.data)
        self.resume_from, self.resume_state = resolve_resume(cfg, D.world_size(), self.work, self.fingerprints)
        self.faults = Faults(D.rank())
        self.faults.end_of_step(0)  # fault injection: a signal during start-up
        self.bad_steps: list[int] = []
        self.last_loss, self.scheduled = math.nan, 0.0
        self.shrink_seconds = 0.0
        seed_everything(cfg.train.seed)
        self.tokenizer = load_tokenizer(self.model_dir)
        t = cfg.train
        # Before the model: rank 0 tokenizes (or reads the cache) while the others wait, then read it.
        context = getattr(base_config, "max_position_embeddings", None)
        train = load_split(cfg.data, "train", self.tokenizer, t.seed, context)
        self.batches = TrainBatches(train, t.micro_batch_size, t.grad_accum, D.world_size(), D.rank(), t.seed)
        self.eval_blocks = load_split(cfg.data, "eval", self.tokenizer, t.seed, context) if cfg.data.eval else None
        model, self._hf_ds = load_model(cfg, self.ds_config, self.model_dir)
        self.structure = discover(model, cfg.pruning.head_unit)
        rp = cfg.lora.rank_pruning  # before any cut: its parameter budget counts the original widths
        self.rank_pruner = (
            RankPruner(model, rp.init_r, rp.target_r, t.steps, rp.warmup, rp.cooldown, rp.every, rp.ema)
            if rp.enabled
            else None
        )
        # Resuming after a shrink: replay the run's cuts on the fresh base, so the engine below holds the
        # checkpoint's (smaller) shapes.
        self.shrink_history = ShrinkHistory()
        if self.resume_from is not None:
            self.shrink_history = ShrinkHistory.from_tensors(load_file(str(self.resume_from / TENSORS)), self.structure)
        if self.shrink_history.events:
            materialize(model)
            apply_history(model, self.shrink_history, cfg.pruning.shrink_columns)
        self.masks = Masks(self.structure, D.device())
        self.masks.set_kept(self.shrink_history.current)
        self.masks.attach(model)
        self.pruner = Pruner(model, self.structure, self.masks, cfg.pruning, t.steps, t.seed)
        self.engine = self._initialize(model)
        self.model = model
        self.distiller: Distiller | None = None
        if cfg.distill.enabled:
            teacher = load_teacher(self.teacher_dir, cfg, self.ds_config) if self.teacher_dir else None
            self.distiller = Distiller(model, self.masks, cfg.distill, teacher)
            if self.shrink_history.events:
                self._separate_teacher()
        self.distill_totals = {"ce": math.nan, "kl": math.nan, "teacher_s": 0.0, "objective_s": 0.0, "step_s": 0.0}
        self.perf = StepPerf(model, self.optimizer, self.pruner, t.steps)

    def _initialize(self, model: nn.Module) -> Any:
        """The DeepSpeed engine over ``model``'s trainable parameters (at start-up and after a shrink)."""
        t = self.cfg.train
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = params
        optimizer = None
        if "optimizer" not in self.ds_config:
            optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=params,
            optimizer=optimizer,
            config=self.ds_config,
            lr_scheduler=self._scheduler if optimizer is None else self._scheduler(optimizer),
        )
        engine.train()  # before the first forward (needed on CPU)
        return engine

    def _shrink_due(self, step: int) -> bool:
        mode = self.cfg.pruning.shrink
        if mode == "off" or not self.pruner.schedule.is_decision(step):
            return False
        return mode == "every_decision" or step == self.pruner.schedule.end

    def _shrink(self, step: int) -> None:
        """Cut the pruned units out of the model and carry on with a new engine (every rank)."""
        t0 = time.perf_counter()
        old = self.shrink_history.current
        new = plan_keeps(self.structure, self.masks.heads, self.masks.channels, old)

        def initialize(model: nn.Module) -> Any:
            # The cut model's mask hooks, before DeepSpeed's as at start-up (an un-adapted projection may
            # have been replaced by a plain Linear).
            self.masks.set_kept(new)
            self.masks.attach(model)
            return self._initialize(model)

        self.engine = shrink_engine(self.engine, self.model, new, old, self.cfg.pruning.shrink_columns, initialize)
        self.shrink_history.events.append((step, new))
        self.pruner.refresh(self.model)
        self.perf.optimizer = self.optimizer
        self.perf.shrunk(step)
        if self.distiller is not None:
            self._separate_teacher()
        self.shrink_seconds += time.perf_counter() - t0
        info(
            f"step {step}: shrank the model to {self.masks.sparsity():.3f} sparsity "
            f"({time.perf_counter() - t0:.1f} s); the rest of the run trains the smaller model"
        )

    def _separate_teacher(self) -> None:
        """After a shrink the base in the engine is cut, so the dense-base teacher is loaded on its own (the
        same frozen weights, another engine) unless the teacher already is another model."""
        assert self.distiller is not None
        if self.distiller.teacher is None:
            self.distiller.use_teacher(load_teacher(str(self.model_dir), self.cfg, self.ds_config))

    def _check_teacher(self, base_config: Any) -> str | None:
        """distill.teacher as a model directory (None: the base itself), checked before any loading."""
        d = self.cfg.distill
        if not d.enabled or d.teacher == "base":
            return None
        teacher_dir = resolve_model_dir(d.teacher, key="distill.teacher")
        vocab = getattr(model_config(teacher_dir), "vocab_size", None)
        if vocab != base_config.vocab_size:
            raise ModelError(
                f"distill.teacher={d.teacher}: vocabulary of {vocab} tokens, the base has "
                f"{base_config.vocab_size}; the teacher must share the base's tokenizer"
            )
        return str(teacher_dir)

    def _forward_loss(self, batch: dict[str, torch.Tensor], parts: torch.Tensor) -> torch.Tensor:
        """The micro-batch's training loss; with distillation, CE and KL are added to ``parts``."""
        if self.distiller is None:
            return self.engine(**batch).loss
        d = self.distiller.loss(self.engine, batch)
        parts += parts.new_tensor([d.ce, d.kl])
        self.distill_totals["teacher_s"] += d.teacher_s
        self.distill_totals["objective_s"] += d.objective_s
        return d.loss

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        t = self.cfg.train
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=t.steps, min_lr_rate=t.min_lr_ratio
        )

    def run(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        out = self.work
        s = self.structure
        info(
            f"{s.model_type}: {s.num_layers} layers, {s.num_heads} heads / {s.num_kv_heads} KV heads, "
            f"MLP {s.intermediate_size}; prunable {s.prunable_params:,} params; world {D.world_size()}; "
            f"decisions at steps {self.pruner.schedule.decision_steps()}"
        )
        if self.resume_from is not None:
            start, eval_before = self._restore(self.resume_from, self.resume_state or {})
        else:
            start = 0
            if D.is_main():
                out.mkdir(parents=True, exist_ok=True)
                start_fresh(out)
            eval_before = evaluate(self.engine, self.eval_blocks, t.micro_batch_size)
        if D.is_main():
            save_config(cfg, out / RUN_CONFIG)
        D.barrier()
        info(f"eval before: loss {eval_before[0]:.4f} ppl {eval_before[1]:.2f}")
        log = RunLogger(out, t.steps, start, cfg.logging, cfg.to_dict(), wandb_dir=Path(cfg.output.dir))
        stop = StopRequest()
        dev = D.device()
        tokens_per_step = self.batches.global_batch * cfg.data.seq_len
        try:
            for step in range(start + 1, t.steps + 1):
                t0 = time.perf_counter()
                self.pruner.begin_step(step)
                self.perf.begin(step)
                self.masks.zero_grad()
                loss_acc = torch.zeros(1, dtype=torch.float64, device=D.comm_device())
                parts = torch.zeros(2, dtype=torch.float64, device=D.comm_device())  # distill: CE, KL
                for micro in range(t.grad_accum):
                    batch = {k: v.to(dev) for k, v in self.batches.micro_batch(step, micro).items()}
                    loss = self.faults.loss(step, self._forward_loss(batch, parts))
                    self.engine.backward(loss)
                    loss_acc += loss.detach().double().to(loss_acc.device)
                    if micro == t.grad_accum - 1:  # gradients are complete and not yet consumed by step()
                        # One all-reduce for the loss, a non-finite loss/gradient anywhere, SIGTERM anywhere and
                        # the ranks' agreement on shrinking after this step.
                        bad_here = not (torch.isfinite(loss_acc).all() and D.local_grads_finite(self.trainable))
                        shrink_here = self.faults.shrink(step, self._shrink_due(step))
                        agree = [float(bad_here), float(stop.requested is not None), float(shrink_here)]
                        flags = torch.cat([loss_acc, loss_acc.new_tensor(agree), parts])
                        D.all_reduce_sum(flags)
                        bad = bool(flags[1] > 0)
                        shrink = _agreed(int(flags[3]), step)
                        if bad:  # a NaN must never reach the weights; Adam's moments still decay
                            D.zero_local_grads(self.trainable)
                        else:
                            if self.pruner.score_due(step):
                                self.pruner.score()
                            if self.rank_pruner and self.rank_pruner.observe_due(step):
                                self.rank_pruner.observe()
                    self.engine.step()
                if bad:
                    self._bad_step(step)
                if self.pruner.schedule.is_decision(step):
                    self.scheduled = self.pruner.decide(step)
                if shrink:
                    self._shrink(step)
                if self.rank_pruner and self.rank_pruner.is_decision(step):
                    self.rank_pruner.decide(step, self.engine)  # after step(): weights and Adam moments
                n_micro = t.grad_accum * D.world_size()
                self.last_loss = (flags[0] / n_micro).item()
                if self.distiller:
                    self.distill_totals.update(ce=(flags[4] / n_micro).item(), kl=(flags[5] / n_micro).item())
                dt = time.perf_counter() - t0
                self.distill_totals["step_s"] += dt
                self.perf.end(step, dt)
                self._log_step(log, step, tokens_per_step / dt)
                if t.eval_every and step % t.eval_every == 0 and step != t.steps:
                    ev = evaluate(self.engine, self.eval_blocks, t.micro_batch_size)
                    log.scalars(step, {"eval/loss": ev[0], "eval/ppl": ev[1]})
                if step < t.steps and (flags[2] > 0 or (t.save_every and step % t.save_every == 0)):
                    ckpt = self._checkpoint(step, eval_before)
                    if flags[2] > 0:
                        raise RunStopped(
                            f"{stop.requested or 'SIGTERM on another rank'}: saved {ckpt} at step {step} of "
                            f"{t.steps}; run the same command again (train.resume=auto) to continue",
                            EXIT_PREEMPTED,
                        )
                self.faults.end_of_step(step)
            eval_after = evaluate(self.engine, self.eval_blocks, t.micro_batch_size)
            log.scalars(t.steps, {"eval/loss": eval_after[0], "eval/ppl": eval_after[1]})
        except BaseException:
            log.close(ok=False)
            raise
        finally:
            stop.close()
            stop_outside_the_loop(AFTER_LOOP)
        info(f"eval after: loss {eval_after[0]:.4f} ppl {eval_after[1]:.2f}; sparsity {self.masks.sparsity():.4f}")
        summary = self._summary(eval_before, eval_after)
        scores = {k: v for k, v in self.pruner.state_dict().items() if k.startswith("scores.")}
        alive = self.rank_pruner.alive if self.rank_pruner else None
        save_run(
            self.model, cfg, self.masks.state_dict(), scores, summary, alive, self.model_dir, out, self.shrink_history
        )
        if out != Path(cfg.output.dir):  # replacing a finished run (output.overwrite): only now does it move aside
            with log.moving(Path(cfg.output.dir)):
                if D.is_main():
                    promote(out, Path(cfg.output.dir))
            D.barrier()
        info(f"wrote {cfg.output.dir}")
        ok = False
        try:
            summary = self._after_run(log, summary)
            ok = True
        finally:
            log.close(ok)
        return summary

    def _after_run(self, log: RunLogger, summary: dict[str, Any]) -> dict[str, Any]:
        """After the run is saved (so a failure or a kill here loses nothing of it): widths.png, the
        lm-eval tasks on the masked model (every rank: its forwards are collective), whose results are
        added to summary.json, and the summary to the loggers."""
        cfg, out = self.cfg, Path(self.cfg.output.dir)
        widths = out / WIDTHS_PNG
        if D.is_main():
            plot_widths(summary, widths)
        if self.lm_eval_tm is not None:
            ev = cfg.eval
            info(f"lm-eval: {', '.join(ev.lm_eval_tasks)} on the masked model")
            results = run_lm_eval(  # every rank; rank 0's results are the ones kept
                self.model,
                self.tokenizer,
                ev.lm_eval_tasks,
                ev.lm_eval_limit or None,
                ev.lm_eval_batch_size,
                self.lm_eval_tm,
                None if ev.lm_eval_num_fewshot < 0 else ev.lm_eval_num_fewshot,
            )
            results = D.broadcast_object(results)
            summary = {**summary, "lm_eval": results}
            log.scalars(cfg.train.steps, {f"lm_eval/{k}/{m}": v for k, ms in results.items() for m, v in ms.items()})
            for task, metrics in results.items():
                info(f"lm-eval {task}: " + ", ".join(f"{m} {v:.4f}" for m, v in metrics.items()))
            if D.is_main():
                write_summary(out, summary)
            D.barrier()
        log.final(cfg.train.steps, summary, widths)
        return summary

    # -- bad steps
    def _bad_step(self, step: int) -> None:
        self.bad_steps.append(step)
        limit = self.cfg.train.max_bad_steps
        info(
            f"warning: step {step}: non-finite loss or gradient on some rank; its update and scores were "
            f"skipped ({len(self.bad_steps)} of train.max_bad_steps={limit})"
        )
        if len(self.bad_steps) >= limit:
            raise RunStopped(
                f"{len(self.bad_steps)} steps with a non-finite loss or gradient (steps {self.bad_steps}), "
                f"train.max_bad_steps={limit}. Lower train.lr, check the data, or use model.dtype=fp32/bf16 "
                "instead of fp16; the checkpoints already written are untouched",
                EXIT_BAD_STEPS,
            )

    # -- logging, checkpoints
    def _log_step(self, log: RunLogger, step: int, tokens_per_s: float) -> None:
        t = self.cfg.train
        values = {
            "train/loss": self.last_loss,
            "train/lr": self.engine.get_lr()[0],
            "prune/sparsity_scheduled": self.pruner.schedule.sparsity(step),
            "prune/sparsity_achieved": self.masks.sparsity(),
            "perf/tokens_per_s": tokens_per_s,
            "perf/peak_memory_mb": peak_memory_mb(),
        }
        if self.distiller:
            values["train/ce"], values["train/kl"] = self.distill_totals["ce"], self.distill_totals["kl"]
        if self.rank_pruner:
            values["lora/adapter_params"] = self.rank_pruner.adapter_params()
            values.update({f"lora/rank/{n}": r for n, r in self.rank_pruner.ranks().items()})
        if step % t.log_every == 0:
            log.scalars(step, values)
            row = {"step": step, "loss": self.last_loss, "lr": values["train/lr"]}
            log.row({**row, "sparsity": values["prune/sparsity_achieved"]})
        log.progress({"loss": f"{self.last_loss:.3f}", "sparsity": f"{self.masks.sparsity():.3f}"})

    def _checkpoint(self, step: int, eval_before: tuple[float, float]) -> Path:
        state = {
            "step": step,
            "world_size": D.world_size(),
            "config": self.cfg.to_dict(),
            "eval_before": list(eval_before),
            "bad_steps": self.bad_steps,
            "last_loss": self.last_loss,
            "scheduled": self.scheduled,
            "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "lora_prune": __version__},
            "compute_dtype": dtype_name(resolve_dtype(self.cfg.model.dtype)),
            "fingerprints": self.fingerprints,
        }
        tensors = {f"pruner.{k}": v for k, v in self.pruner.state_dict().items()}
        if self.rank_pruner:
            tensors.update({f"rank_pruner.{k}": v for k, v in self.rank_pruner.state_dict().items()})
        tensors.update(self.shrink_history.tensors())
        ckpt = save_checkpoint(self.engine, self.work, step, state, tensors, self.cfg.train.keep_last)
        info(f"checkpoint {ckpt}")
        return ckpt

    def _restore(self, ckpt: Path, state: dict[str, Any]) -> tuple[int, tuple[float, float]]:
        tensors = load_checkpoint(self.engine, ckpt)
        self.pruner.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("pruner.")})
        if self.rank_pruner:
            self.rank_pruner.load_state_dict({k[12:]: v for k, v in tensors.items() if k.startswith("rank_pruner.")})
        self.bad_steps = list(state["bad_steps"])
        self.last_loss, self.scheduled = _num(state["last_loss"]), state["scheduled"]
        D.verify_identical([self.masks.heads, self.masks.channels], "resumed masks")
        start = int(state["step"])
        out = self.work
        if D.is_main():
            out.mkdir(parents=True, exist_ok=True)
            if ckpt.parent.resolve() == (out / CHECKPOINTS).resolve():
                supersede_after(ckpt)
        info(f"resumed from {ckpt} at step {start} of {self.cfg.train.steps}")
        return start, (_num(state["eval_before"][0]), _num(state["eval_before"][1]))

    def _summary(self, before: tuple[float, float], after: tuple[float, float]) -> dict[str, Any]:
        cfg, s, m = self.cfg, self.structure, self.masks
        heads = m.heads.detach().cpu() > 0
        kv = heads.view(s.num_layers, s.num_kv_heads, s.heads_per_group).any(-1)
        return {
            "model_path": cfg.model.path,
            "model_source": source_record(self.model_dir, cfg.model.path),
            "model_type": s.model_type,
            "structure": s.to_dict(),
            "quantization": cfg.model.quantization,
            # What "auto" resolved to here: export replays NF4 in it wherever it runs (issue: bf16 on a GPU
            # replayed in fp32 on a CPU moves ~0.4% of weights to another NF4 level).
            "compute_dtype": dtype_name(resolve_dtype(cfg.model.dtype)),
            "version": __version__,
            "criterion": cfg.pruning.criterion,
            "scope": cfg.pruning.scope,
            "round_to": width_rules(s, cfg.pruning).round_to,  # pruning.round_to=0 (auto) resolved
            "target_sparsity": cfg.pruning.target_sparsity,
            "scheduled_sparsity_final": self.scheduled,
            "achieved_sparsity": m.sparsity(),
            "prunable_params": s.prunable_params,
            "pruned_params": m.pruned_params(),
            "kept_heads_per_layer": heads.sum(-1).tolist(),
            "kept_kv_heads_per_layer": kv.sum(-1).tolist(),
            "kept_channels_per_layer": (m.channels.detach().cpu() > 0).sum(-1).tolist(),
            "steps": cfg.train.steps,
            "world_size": D.world_size(),
            "global_batch": self.batches.global_batch,
            "tokens_seen": cfg.train.steps * self.batches.global_batch * cfg.data.seq_len,
            "decision_steps": self.pruner.decisions,
            "score_events": self.pruner.tracker.events,
            "skipped_score_events": self.pruner.tracker.skipped,
            "bad_steps": self.bad_steps,
            "train_loss_final": self.last_loss,
            "eval_loss_before": before[0],
            "eval_ppl_before": before[1],
            "eval_loss_after": after[0],
            "eval_ppl_after": after[1],
            "peak_memory_mb": peak_memory_mb(),
            "perf": self.perf.summary(),
            "adapter_ranks": self.rank_pruner.ranks() if self.rank_pruner else None,
            "adapter_params": self.rank_pruner.adapter_params() if self.rank_pruner else None,
            "distill": self._distill_summary(),
            "shrink": {
                "mode": cfg.pruning.shrink,
                "columns": cfg.pruning.shrink_columns,
                "steps": self.shrink_history.steps(),
                "seconds": self.shrink_seconds,
            },
            "fingerprints": self.fingerprints,
        }

    def _distill_summary(self) -> dict[str, Any] | None:
        if self.distiller is None:
            return None
        d, tot = self.cfg.distill, self.distill_totals
        return {
            **dataclasses.asdict(d),
            "train_ce_final": tot["ce"],
            "train_kl_final": tot["kl"],
            # Shares of this process's training-step time (steps run by this process): the teacher's
            # forward and the chunked loss (which also does the work of the plain CE it replaces).
            # The step-time ratio against a run without distillation is a benchmark figure.
            "teacher_time_share": tot["teacher_s"] / tot["step_s"] if tot["step_s"] else None,
            "objective_time_share": tot["objective_s"] / tot["step_s"] if tot["step_s"] else None,
        }


def _agreed(n: int, step: int) -> bool:
    """Whether the ranks shrink at ``step``: all of them (n = world size) or none; anything else is a bug that
    would leave the ranks with different models, so the run stops."""
    if n not in (0, D.world_size()):
        raise RuntimeError(
            f"step {step}: {n} of {D.world_size()} ranks would shrink the model; the ranks must agree. Stopping "
            "(this is a bug; the checkpoints already written are untouched)"
        )
    return n > 0


def _num(x: float | None) -> float:
    """A number read back from strict JSON, where NaN was written as null."""
    return math.nan if x is None else float(x)
