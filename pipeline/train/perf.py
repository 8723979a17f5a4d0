"""What a run costs, reported in ``summary.json`` under ``perf``: step times, scoring time and traffic,
and the tensor memory of one training step that includes a scoring event.

Memory is measured on one *probe step*: the first step from step 2 on that scores (step 1 creates
the optimizer state and fetches ZeRO-3's persistent parameters, so it is not representative), or
step 2 when nothing is scored (plain LoRA). It is ``resident + transient``:

* GPU: ``torch.cuda.memory_allocated()`` at the start of the step, and the allocator's peak over the
  step (forward and backward of every micro-batch, scoring, ``step()``, the mask decision).
* CPU (no allocator statistics): resident = the storages the model and optimizer hold at the start
  of the step (parameters and ZeRO-3 partitions, NF4 quant state, gradients, fp32 master weights,
  Adam moments, gradient buckets; ``resident_by_kind_mb`` splits off DeepSpeed's reduce bucket,
  which is allocated whole at start-up whatever the model size); transient = the peak bytes of
  tensor storages created during the step and alive at the same time (``LiveBytes``). Memory the
  step frees from before it is not subtracted, and allocations outside torch's dispatcher
  (communication buffers, allocator slack) are not seen, so this is tensor memory, not the process
  footprint; ``peak_memory_mb`` in the summary keeps the process's peak resident set.

The probe step runs under a Python dispatch mode on CPU, so it is slower; it is left out of the
step-time statistics, as is step 1.
"""

from __future__ import annotations

import statistics
import weakref
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

MB = 2**20


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the block and alive at the same time. Outputs that
    reuse an input's storage (views, in-place ops) are not new memory."""

    def __init__(self) -> None:
        super().__init__()
        self._seen = WeakIdKeyDictionary()
        self._refs: dict[int, weakref.ref] = {}
        self.current = self.peak = 0

    def _freed(self, key: int, n: int) -> None:
        self.current -= n
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            if st in self._seen or st.data_ptr() in inputs:
                continue
            n = st.nbytes()
            self._seen[st] = n
            self.current += n
            self.peak = max(self.peak, self.current)
            key = id(st)
            self._refs[key] = weakref.ref(st, lambda _, k=key, n=n: self._freed(k, n))
        return out


def held_bytes(model: nn.Module, optimizer: Any = None) -> dict[str, int]:
    """Bytes of the distinct storages the model and a DeepSpeed ZeRO-3 optimizer hold at rest, by kind:
    ``model`` (parameters, ZeRO-3 partitions, NF4 quant state, gradients), ``optimizer`` (fp32 master,
    flat gradient partition, Adam moments) and ``reduce_bucket`` (allocated whole at start-up, with
    ``reduce_bucket_size`` elements whatever the model size)."""
    seen: set[int] = set()
    out = {"model": 0, "optimizer": 0, "reduce_bucket": 0}

    def add(kind: str, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            return
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            out[kind] += t.untyped_storage().nbytes()

    for p in model.parameters():
        for t in (p.data, p.grad, getattr(p, "ds_tensor", None)):
            add("model", t)
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code, qs.offset, *((qs.state2.absmax, qs.state2.code) if qs.nested else ())):
                add("model", t)
    if optimizer is not None:
        # DeepSpeed's stage-3 optimizer internals; missing attributes (another optimizer) count 0.
        for bucket in getattr(optimizer, "ipg_buckets", {}).values():
            add("reduce_bucket", getattr(bucket, "buffer", None))
        for t in getattr(optimizer, "fp32_partitioned_groups_flat", []):
            add("optimizer", t)
        add("optimizer", getattr(optimizer, "grad_partitions_flat_buffer", None))
        inner = getattr(optimizer, "optimizer", optimizer)
        for state in getattr(inner, "state", {}).values():
            for t in state.values():
                add("optimizer", t)
    return out


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


class StepPerf:
    """Called by the trainer around every step; ``summary()`` goes into ``summary.json`` as ``perf``."""

    def __init__(self, model: nn.Module, optimizer: Any, pruner: Any, steps: int) -> None:
        self.model, self.optimizer, self.pruner = model, optimizer, pruner
        self.probe_step = next((t for t in range(2, steps + 1) if pruner.score_due(t)), min(2, steps))
        self.steps = steps
        self.seconds: dict[int, float] = {}
        self.scored: set[int] = set()
        self.probes = {self.probe_step: "memory"}  # step -> the summary key its measurement goes to
        self.measured: dict[str, dict[str, Any]] = {}
        self._live: LiveBytes | None = None
        self._resident = 0
        self._held: dict[str, int] = {}

    def shrunk(self, step: int) -> None:
        """The model was cut at ``step``: probe the smaller model too, two steps on (the first step of a new
        engine fetches ZeRO-3's persistent parameters), as ``memory_after_shrink``."""
        if step + 2 <= self.steps:
            self.probes[step + 2] = "memory_after_shrink"

    def begin(self, step: int) -> None:
        if step not in self.probes:
            return
        self._held = held_bytes(self.model, self.optimizer)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self._resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self._resident = sum(self._held.values())
            self._live = LiveBytes()
            self._live.__enter__()

    def end(self, step: int, seconds: float) -> None:
        self.seconds[step] = seconds
        if self.pruner.score_due(step):
            self.scored.add(step)
        if step not in self.probes:
            return
        if self._live is not None:
            self._live.__exit__(None, None, None)
            transient, method = self._live.peak, "CPU: storages held + peak of storages created in the step"
            self._live = None
        else:
            torch.cuda.synchronize()
            transient, method = torch.cuda.max_memory_allocated() - self._resident, "CUDA allocator"
        self.measured[self.probes[step]] = {
            "probe_step": step,
            "probe_step_scored": step in self.scored,
            "method": method,
            "resident_mb": self._resident / MB,
            "resident_by_kind_mb": {k: v / MB for k, v in self._held.items()},
            "transient_mb": transient / MB,
            "step_peak_mb": (self._resident + transient) / MB,
        }

    def summary(self) -> dict[str, Any]:
        timed = {t: s for t, s in self.seconds.items() if t != 1 and t not in self.probes}
        end = self.pruner.schedule.end if self.pruner.active else 0
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        p = self.pruner
        events = p.tracker.events + p.tracker.skipped
        return {
            "steps_timed": len(timed),
            "step_s_median": _median(list(timed.values())),
            "step_s_mean": statistics.fmean(timed.values()) if timed else None,
            "scoring_step_s_median": _median([s for t, s in timed.items() if t in self.scored]),
            "plain_step_s_median": _median([s for t, s in timed.items() if t not in self.scored]),
            # Up to and after the final mask decision (where pruning.shrink=final cuts the model).
            "step_s_median_to_final_decision": _median([s for t, s in timed.items() if t <= end]),
            "step_s_median_after_final_decision": _median([s for t, s in timed.items() if t > end]),
            "train_s": sum(self.seconds.values()),
            "score_events": events,
            "score_s": p.score_seconds,
            "score_s_per_event": p.score_seconds / events if events else None,
            "score_allreduce_bytes_per_event": p.score_allreduce_bytes / events if events else None,
            "trainable_params": sum(getattr(q, "ds_numel", q.numel()) for q in trainable),
            "trainable_bytes_per_param": trainable[0].element_size() if trainable else 0,
            **self.measured,
        }
