"""Self-distillation: the chunked loss against full-logit autograd, and the teacher against the base."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from pipeline.config.schema import ConfigError, DistillConfig, config_from_dict
from pipeline.model.structure import discover
from pipeline.pruning.masks import Masks
from pipeline.train.distill import Distiller, distill_objective


def _reference(h_s, h_t, labels, w, temperature, top_k=0):
    """Full logits, transformers' shift-and-mean, the textbook KL."""
    z_s, z_t = h_s @ w.T, h_t @ w.T
    y = labels[:, 1:].reshape(-1)
    z_s, z_t = z_s[:, :-1].reshape(-1, w.shape[0]), z_t[:, :-1].reshape(-1, w.shape[0])
    keep = y != -100
    z_s, z_t, y = z_s[keep], z_t[keep], y[keep]
    ce = F.cross_entropy(z_s, y)
    t = z_t / temperature
    if top_k:
        t, idx = t.topk(top_k, -1)
        log_s = F.log_softmax((z_s / temperature).gather(-1, idx), -1)
    else:
        log_s = F.log_softmax(z_s / temperature, -1)
    log_t = F.log_softmax(t, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    return ce, kl


@pytest.mark.parametrize(("chunk", "temperature", "top_k"), [(1000, 1.0, 0), (7, 2.0, 0), (5, 1.5, 9)])
def test_chunked_terms_and_grads_equal_full_logits(chunk, temperature, top_k):
    g = torch.Generator().manual_seed(0)
    b, s, h, v = 3, 11, 16, 40
    w = torch.randn(v, h, generator=g, dtype=torch.float64)
    h_t = torch.randn(b, s, h, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[0, :4] = -100  # a masked prompt
    labels[2, 7:] = -100  # padding
    x = torch.randn(b, s, h, generator=g, dtype=torch.float64)
    h1, h2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    alpha = 0.7
    obj, ce, kl = distill_objective(h1, h_t, labels, w, None, alpha, temperature, top_k, chunk)
    ce_ref, kl_ref = _reference(h2, h_t, labels, w, temperature, top_k)
    obj_ref = (1 - alpha) * ce_ref + alpha * temperature**2 * kl_ref
    torch.testing.assert_close(ce.double(), ce_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kl.double(), kl_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(obj.double(), obj_ref, rtol=1e-5, atol=1e-6)
    (2.0 * obj).backward()
    (2.0 * obj_ref).backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-7)
    assert kl.item() > 0.01


def test_kl_is_zero_when_student_is_teacher():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 9, 8, generator=g)
    w = torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 30, (2, 9), generator=g)
    for top_k in (0, 5):
        _, _, kl = distill_objective(h.clone().requires_grad_(), h, labels, w, None, 0.5, 2.0, top_k, 4)
        assert abs(kl.item()) < 1e-6


def test_no_targets_gives_zero_and_a_connected_graph():
    h = torch.randn(1, 5, 4, requires_grad=True)
    obj, ce, kl = distill_objective(h, h.detach(), torch.full((1, 5), -100), torch.randn(7, 4))
    obj.backward()
    assert obj.item() == ce.item() == kl.item() == 0 and h.grad is not None


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_teacher_is_the_unpruned_base(make_model, arch):
    """Adapters trained away from zero and half the units masked: the teacher pass still gives the
    logits of the base loaded on its own, and the student pass gives the masked, adapted model's."""
    path = make_model(arch)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, PeftLoraConfig(r=4, target_modules=["q_proj", "o_proj", "down_proj"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    model.eval()
    s = discover(model, "kv_group")
    masks = Masks(s)
    masks.attach(model)
    masks.heads[:, : s.heads_per_group] = 0  # first KV group of every layer
    masks.channels[:, ::2] = 0
    d = Distiller(model, masks, DistillConfig(enabled=True, alpha=1.0))
    ids = torch.randint(0, base.config.vocab_size, (2, 12))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    w = d.student.head_weight()
    with d._as_teacher():
        h_t = d.student.run(model, inputs)
    h_s = d.student.run(model, inputs)
    with torch.no_grad():
        torch.testing.assert_close(h_t @ w.T, base(**inputs).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h_s @ w.T, model(**inputs).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(h_s, h_t, atol=1e-3)
    out = d.loss(model, {**inputs, "labels": ids})
    assert out.kl > 0 and out.loss.requires_grad


def test_distill_config_errors_reported_together():
    with pytest.raises(ConfigError) as e:
        config_from_dict(
            {
                "model": {"path": "m"},
                "data": {"train": "t"},
                "lora": {"target_modules": ["q_proj", "lm_head"]},
                "distill": {"enabled": True, "alpha": 1.5, "temperature": 0, "top_k": -1, "teacher": ""},
            }
        )
    msg = str(e.value)
    for key in ("distill.alpha", "distill.temperature", "distill.top_k", "distill.teacher", "lm_head"):
        assert key in msg, key
