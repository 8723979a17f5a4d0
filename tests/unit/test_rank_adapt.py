"""Rank pruning (OBS in coefficient space) and rank dropout on a PEFT model, without DeepSpeed."""

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from pipeline.pruning.rank_dropout import attach_rank_dropout
from pipeline.pruning.rank_pruning import RankPruner, lora_layers


def _peft(model_dir, r=8):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"]))
    for n, p in peft.named_parameters():
        p.requires_grad = "lora_" in n
    return peft


def _step(peft, opt, x):
    opt.zero_grad()
    peft(input_ids=x, labels=x).loss.backward()


def test_removed_components_stay_zero_with_adam(make_model):
    peft = _peft(make_model("llama"))
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    engine = SimpleNamespace(optimizer=opt)
    rp = RankPruner(peft, init_r=8, target_r=2, steps=12, warmup=0.0, cooldown=0.5, every=2)
    x = torch.randint(0, 500, (2, 16))
    for t in range(1, 13):
        _step(peft, opt, x)
        rp.observe()
        opt.step()
        if rp.is_decision(t):
            rp.decide(t, engine)
    assert rp.adapter_params() <= rp.full_params // 4  # the budget: plain LoRA at r=2
    for _ in range(5):  # many more steps: nothing comes back
        _step(peft, opt, x)
        opt.step()
    for name, m in lora_layers(peft):
        dead = ~rp.alive[name]
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
        assert dead.any()
        assert torch.all(a[dead] == 0) and torch.all(b[:, dead] == 0)
        for p, sl in ((a, (dead, slice(None))), (b, (slice(None), dead))):
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.all(opt.state[p][key][sl] == 0)


def test_obs_recovery_matches_quadratic_model():
    """With F exact, removing a component and rescaling the others by 1 + delta costs 1/2 c^T (F^-1_EE)^-1 c."""
    rp = RankPruner.__new__(RankPruner)
    rp.init_r, rp.damping, rp.layers = 3, 0.0, [("m", None)]
    rp.alive = {"m": torch.ones(3, dtype=torch.bool)}
    f = torch.tensor([[2.0, 0.5, 0.1], [0.5, 1.0, 0.2], [0.1, 0.2, 3.0]], dtype=torch.float64)
    rp.fisher = {"m": f}
    finv = torch.linalg.inv(f)
    e = torch.tensor([1])
    delta = -finv[:, e] @ torch.linalg.solve(finv[e][:, e], torch.ones(1, dtype=f.dtype))
    assert delta[1] == pytest.approx(-1.0)
    cost = 0.5 * delta @ f @ delta
    assert cost == pytest.approx(rp.costs()["m"][1])
    # Any other compensation costs more.
    for other in ([0.0, -1.0, 0.0], [0.1, -1.0, -0.05]):
        d = torch.tensor(other, dtype=f.dtype)
        assert 0.5 * d @ f @ d >= cost - 1e-12


def test_rank_dropout_is_identity_in_eval_and_unbiased_in_train(make_model):
    peft = _peft(make_model("llama"))
    for _, m in lora_layers(peft):  # non-zero B so the adapter path matters
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.5)
    x = torch.randint(0, 500, (1, 8))
    peft.eval()
    with torch.no_grad():
        ref = peft(input_ids=x).logits
    attach_rank_dropout(peft, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(peft(input_ids=x).logits, ref, rtol=0, atol=0)
        layer = dict(lora_layers(peft))["model.layers.0.self_attn.q_proj"]
        layer.train()
        h = torch.randn(4000, 64)
        base = layer.base_layer(h)
        dropped = layer(h) - base
        layer.eval()
        clean = layer(h) - base
    assert not torch.allclose(dropped, clean)
    # E[dropped] = clean: the mean over 4000 tokens of the same input row converges.
    same = torch.randn(1, 64).expand(4000, 64)
    with torch.no_grad():
        layer.train()
        mean = (layer(same) - layer.base_layer(same)).mean(0)
        layer.eval()
        torch.testing.assert_close(mean, (layer(same[:1]) - layer.base_layer(same[:1]))[0], rtol=0.1, atol=0.05)
