"""Self-distillation: the pruned student learns the dense model's next-token distribution.

The teacher is, by default, the same engine with the LoRA adapters disabled and the masks bypassed,
which is exactly the original (NF4) model, already sharded: no extra weights in memory, one extra
forward without gradients per micro-batch. ``distill.teacher`` may instead name another model
directory with the same vocabulary; it is loaded frozen in 4-bit into its own ZeRO-3 engine.

The loss on the target positions (shifted labels != -100, so packing and prompt masking hold) is

    (1 - alpha) * CE(student) + alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))

averaged over target tokens, as transformers averages its own causal-LM loss. Logits are never
materialised for the whole micro-batch: both models return only their final hidden states, and the
output projection, softmaxes, KL and the gradient with respect to the student's hidden states are
computed together over chunks of ``chunk_tokens`` positions (as fused linear-cross-entropy kernels
do), so memory grows with chunk x vocabulary, not sequence x vocabulary, and backward recomputes
nothing.
The output embedding is frozen (it is not a LoRA target), so it is gathered once and kept.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.pruning.masks import Masks

IGNORE = -100


@dataclass
class DistillLoss:
    loss: torch.Tensor  # the training objective (with grad)
    ce: float  # mean cross-entropy on the targets
    kl: float  # mean KL(teacher || student) at the temperature, before the T^2 factor
    teacher_s: float  # seconds in the teacher's forward
    objective_s: float  # seconds in the chunked loss and its gradient w.r.t. the hidden states


class _FusedObjective(torch.autograd.Function):
    """The objective and its gradient with respect to the student's hidden states in one pass over
    chunks of positions: each chunk's logits exist only while it is processed, and nothing is
    recomputed in backward, which just scales the stored gradient."""

    @staticmethod
    def forward(ctx: Any, h_s, h_t, y, w_s, w_t, alpha: float, temperature: float, top_k: int, chunk: int):
        n, t = y.numel(), temperature
        grad = torch.empty_like(h_s)
        sums = torch.zeros(2, dtype=torch.float32, device=h_s.device)  # CE, KL
        for i in range(0, n, chunk):
            c = slice(i, i + chunk)
            z_s = (h_s[c] @ w_s.T).float()
            z_t = (h_t[c] @ w_t.T).float() / t
            if top_k:
                z_t, idx = z_t.topk(top_k, dim=-1)
            log_p_t = F.log_softmax(z_t, dim=-1)
            p_t = log_p_t.exp()
            # top k: both distributions restricted to the teacher's k tokens (zero KL at the teacher)
            z = z_s / t
            log_q = F.log_softmax(z.gather(-1, idx) if top_k else z, dim=-1)
            log_p_s = F.log_softmax(z_s, dim=-1)
            sums[0] -= log_p_s.gather(-1, y[c, None]).sum()
            sums[1] += (p_t * (log_p_t - log_q)).sum()
            # d/dz_s of (1 - alpha) CE + alpha T^2 KL: (1 - alpha)(softmax - onehot) + alpha T (q - p_t)
            dz = log_p_s.exp_().mul_(1.0 - alpha)
            dz.scatter_add_(-1, y[c, None], dz.new_full((dz.shape[0], 1), -(1.0 - alpha)))
            dq = (log_q.exp() - p_t).mul_(alpha * t)
            if top_k:
                dz.scatter_add_(-1, idx, dq)
            else:
                dz += dq
            grad[c] = (dz.to(w_s.dtype) @ w_s).to(h_s.dtype)
        ctx.save_for_backward(grad / n)
        ce, kl = sums / n
        objective = (1.0 - alpha) * ce + alpha * t * t * kl
        ctx.mark_non_differentiable(ce, kl)
        return objective, ce, kl

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor, _g_ce: Any, _g_kl: Any):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None, None, None, None, None, None


def distill_objective(
    h_s: torch.Tensor,
    h_t: torch.Tensor,
    labels: torch.Tensor,
    w_s: torch.Tensor,
    w_t: torch.Tensor | None = None,
    alpha: float = 0.5,
    temperature: float = 1.0,
    top_k: int = 0,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(1 - alpha) CE + alpha T^2 KL`` (differentiable in ``h_s``), mean CE and mean KL, over the
    target positions of final hidden states ``(B, S, H)``.

    ``labels`` are the unshifted causal-LM labels (position i predicts ``labels[i + 1]``), as passed
    to transformers; ``w_s``/``w_t`` are the student's and teacher's output embeddings ``(V, H)``."""
    w_t = w_s if w_t is None else w_t
    shift = labels[:, 1:]
    sel = shift != IGNORE
    hs, ht, y = h_s[:, :-1][sel], h_t[:, :-1][sel].detach(), shift[sel]
    if y.numel() == 0:  # keep the graph connected so that backward runs on every rank
        zero = h_s.sum() * 0.0
        return zero, zero.detach(), zero.detach()
    return _FusedObjective.apply(hs, ht, y, w_s.detach(), w_t.detach(), alpha, temperature, top_k, chunk_tokens)


def _gathered(weight: nn.Parameter) -> torch.Tensor:
    """A full detached copy of a (possibly ZeRO-3 partitioned) frozen parameter."""
    if hasattr(weight, "ds_id"):
        with deepspeed.zero.GatheredParameters([weight]):
            return weight.detach().clone()
    return weight.detach()


class _FinalHidden:
    """Captures the decoder's final (normed) hidden states of a causal LM during a forward."""

    def __init__(self, causal_lm: nn.Module) -> None:
        self.causal_lm = causal_lm
        self.value: torch.Tensor | None = None
        self.active = False
        self._weight: torch.Tensor | None = None
        causal_lm.get_decoder().register_forward_hook(self._hook)

    def _hook(self, _module: nn.Module, _args: Any, out: Any) -> None:
        if self.active:
            self.value = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def run(self, forward: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        self.active = True
        try:
            # Only the last position goes through lm_head here; the chunked loss projects the rest.
            forward(**inputs, logits_to_keep=1, use_cache=False)
        finally:
            self.active = False
        value, self.value = self.value, None
        assert value is not None, "the decoder's forward hook did not fire"
        return value

    def head_weight(self) -> torch.Tensor:
        if self._weight is None:
            self._weight = _gathered(self.causal_lm.get_output_embeddings().weight)
        return self._weight


class Distiller:
    """Computes the distillation objective of one micro-batch for the trainer."""

    def __init__(self, model: nn.Module, masks: Masks, cfg: Any, teacher: Any = None) -> None:
        self.peft, self.masks, self.cfg = model, masks, cfg
        self.student = _FinalHidden(model.get_base_model())
        # teacher: None = the base inside the student's engine; else (engine, its causal LM)
        self.teacher_engine = teacher[0] if teacher else None
        self.teacher = _FinalHidden(teacher[1]) if teacher else None

    def use_teacher(self, teacher: tuple[Any, nn.Module]) -> None:
        """Distil from ``teacher`` (engine, its causal LM) from now on (the base after a shrink)."""
        self.teacher_engine = teacher[0]
        self.teacher = _FinalHidden(teacher[1])

    @contextlib.contextmanager
    def _as_teacher(self):
        with torch.no_grad(), self.peft.disable_adapter(), self.masks.bypassed():
            yield

    def loss(self, forward: Any, batch: dict[str, torch.Tensor]) -> DistillLoss:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        _sync()
        t0 = time.perf_counter()
        if self.teacher is None:
            with self._as_teacher():
                h_t = self.student.run(forward, inputs)
            w_t = None
        else:
            with torch.no_grad():
                h_t = self.teacher.run(self.teacher_engine, inputs)
            w_t = self.teacher.head_weight()
        _sync()
        teacher_s = time.perf_counter() - t0
        h_s = self.student.run(forward, inputs)
        c, labels = self.cfg, batch["labels"]
        w_s = self.student.head_weight()
        _sync()
        t1 = time.perf_counter()
        loss, ce, kl = distill_objective(h_s, h_t, labels, w_s, w_t, c.alpha, c.temperature, c.top_k, c.chunk_tokens)
        ce_v, kl_v = ce.item(), kl.item()  # .item() waits for the device
        return DistillLoss(loss, ce_v, kl_v, teacher_s, time.perf_counter() - t1)


def _sync() -> None:
    """Wait for queued GPU work, so that the wall-clock shares above are the work's (no-op on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def load_teacher(path: str, cfg: Any, ds_config: dict[str, Any]) -> tuple[Any, nn.Module]:
    """Another model as the teacher: frozen, 4-bit like the base, in an inference-only ZeRO-3 engine."""
    from pipeline.model.loading import load_frozen

    model = load_frozen(path, cfg)
    inference = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
    engine, *_ = deepspeed.initialize(model=model, config=inference)
    engine.eval()
    return engine, model
