"""The LoRA-guided criterion against an independent computation on a PEFT model (no DeepSpeed)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from pipeline.config.schema import ConfigError, PruningConfig, config_from_dict
from pipeline.model.structure import discover
from pipeline.pruning.aggregation import combine
from pipeline.pruning.criteria import CRITERIA, ModuleCriterion, ScoringContext
from pipeline.pruning.importance import (
    ScoreLayout,
    base_weight,
    lora_module_scores,
    module_refs,
    module_scores,
)
from pipeline.pruning.masks import Masks

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _criterion(name: str, peft, layout: ScoreLayout) -> ModuleCriterion:
    """The registered criterion ``name`` on ``peft`` with the default settings (as the pruner makes it)."""
    s = layout.s
    return CRITERIA[name](ScoringContext(s, module_refs(peft), layout, Masks(s), PruningConfig(criterion=name), 0))


def _trained_peft(model_dir, r=4, alpha=8.0, targets=tuple(ALL)):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets)))
    for n, p in peft.named_parameters():
        p.requires_grad = "lora_" in n
        if "lora_B" in n:  # as after some training: B != 0, so every term of the proxy matters
            torch.nn.init.normal_(p, std=0.05)
    x = torch.randint(0, 500, (2, 16))
    peft(input_ids=x, labels=x).loss.backward()
    return peft


def test_proxy_equals_exact_gradient_terms():
    """G_B = s G A^T and G_A = s B^T G, so s (G_B A + B G_A) is the LoRA-subspace projection of G."""
    torch.manual_seed(0)
    w, a, b = torch.randn(6, 5), torch.randn(3, 5, requires_grad=True), torch.randn(6, 3, requires_grad=True)
    s, x = 2.0, torch.randn(4, 5)
    merged = w + s * b @ a
    merged.retain_grad()
    (x @ merged.T).pow(2).sum().backward()
    g = merged.grad
    torch.testing.assert_close(b.grad, s * g @ a.detach().T)
    torch.testing.assert_close(a.grad, s * b.detach().T @ g)
    proxy = s * (b.grad @ a.detach() + b.detach() @ a.grad - b.grad @ a.grad)
    expected_rows = (merged.detach() * proxy).abs().sum(1)
    got = lora_module_scores(w, a.detach(), b.detach(), a.grad, b.grad, s, "gate_proj", 1)
    torch.testing.assert_close(got.float(), expected_rows)
    got_cols = lora_module_scores(w, a.detach(), b.detach(), a.grad, b.grad, s, "down_proj", 1)
    torch.testing.assert_close(got_cols.float(), (merged.detach() * proxy).abs().sum(0))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_module_scores_match_brute_force(make_model, arch: str):
    peft = _trained_peft(make_model(arch))
    s = discover(peft)
    layout = ScoreLayout(s)
    flat = module_scores(module_refs(peft), layout, _criterion("lora", peft, layout))
    for ref in module_refs(peft):
        m = ref.module
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        sc = m.scaling["default"]
        merged = m.base_layer.weight + sc * b @ a
        proxy = sc * (b.grad @ a + b @ a.grad - b.grad @ a.grad)
        e = (merged * proxy).abs().detach()
        per = e.sum(0) if ref.name in ("o_proj", "down_proj") else e.sum(1)
        if ref.name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            per = per.view(-1, s.head_dim).sum(-1)
        torch.testing.assert_close(layout.slice(flat, ref.layer, ref.name), per.double(), rtol=1e-5, atol=1e-9)
    heads, chans = combine(flat, layout, "l2")
    assert heads.shape == (2, 4) and chans.shape == (2, 96)
    assert torch.isfinite(heads).all() and (heads > 0).all()


def test_magnitude_scores_are_unit_norms(make_model):
    peft = _trained_peft(make_model("llama"))
    s = discover(peft)
    layout = ScoreLayout(s)
    flat = module_scores(module_refs(peft), layout, _criterion("magnitude", peft, layout))
    m = peft.base_model.model.model.layers[0].mlp.down_proj
    merged = m.base_layer.weight + m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
    torch.testing.assert_close(layout.slice(flat, 0, "down_proj"), merged.detach().norm(dim=0).double())


@pytest.mark.parametrize("targets", [ALL, ["o_proj", "down_proj"]], ids=["lora-all", "lora-o-down"])
def test_full_grad_scores_match_autograd(make_model, targets):
    """``full_grad`` = sum |W' * dL/dW| per unit, dL/dW over two micro-batches (loss / 2 each, as the
    engine scales it), against autograd on the base weights; also for projections without adapters,
    whose inputs carry no gradient in the first layer."""
    peft = _trained_peft(make_model("llama"), targets=targets)
    s = discover(peft)
    layout, refs = ScoreLayout(s), module_refs(peft)
    xs = [torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    crit = _criterion("full_grad", peft, layout)
    refs, full = crit.ctx.refs, crit.full
    full.arm(False)
    peft(input_ids=xs[0], labels=xs[0]).loss.backward()  # not armed: nothing accumulated
    assert all(g is None for g in full.grads)
    full.arm(True)
    for x in xs:
        (peft(input_ids=x, labels=x).loss / 2).backward()
    assert all(g is not None for g in full.grads)
    flat = module_scores(refs, layout, crit)
    full.arm(False)
    full.remove()

    for ref in refs:
        base_weight(ref.module).requires_grad_(True)
        base_weight(ref.module).grad = None
    for x in xs:
        (peft(input_ids=x, labels=x).loss / 2).backward()
    expected = torch.zeros_like(flat)
    for ref in refs:
        w = base_weight(ref.module)
        merged = w.detach().clone()
        if ref.has_lora:
            m = ref.module
            merged += m.scaling["default"] * m.lora_B["default"].weight.detach() @ m.lora_A["default"].weight.detach()
        e = (merged * w.grad).abs()
        per = e.sum(0) if ref.name in ("o_proj", "down_proj") else e.sum(1)
        if ref.name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            per = per.view(-1, s.head_dim).sum(-1)
        layout.slice(expected, ref.layer, ref.name).copy_(per.double())
    assert (expected > 0).all()
    torch.testing.assert_close(flat, expected, rtol=1e-4, atol=1e-10)
    # Same unit ranking as the reference, per layer.
    for got, want in zip(combine(flat, layout, "none"), combine(expected, layout, "none"), strict=True):
        assert torch.equal(got.argsort(-1), want.argsort(-1))


def test_full_grad_needs_the_unquantized_base(make_model):
    data = {
        "model": {"path": str(make_model("llama")), "quantization": "nf4"},
        "data": {"train": "t.txt"},
        "pruning": {"criterion": "full_grad"},
    }
    with pytest.raises(ConfigError, match=r"pruning.criterion=full_grad .* set model.quantization=none"):
        config_from_dict(data)
    data["model"]["quantization"] = "none"
    assert config_from_dict(data).pruning.criterion == "full_grad"
