"""The LoRA-guided criterion against an independent computation on a PEFT model (no DeepSpeed)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from pipeline.aggregation import combine
from pipeline.importance import ScoreLayout, lora_module_scores, module_refs, module_scores
from pipeline.structure import discover


def _trained_peft(model_dir, r=4, alpha=8.0):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(
        model,
        LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
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
    flat = module_scores(module_refs(peft), layout, "lora")
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
    flat = module_scores(module_refs(peft), layout, "magnitude")
    m = peft.base_model.model.model.layers[0].mlp.down_proj
    merged = m.base_layer.weight + m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
    torch.testing.assert_close(layout.slice(flat, 0, "down_proj"), merged.detach().norm(dim=0).double())
