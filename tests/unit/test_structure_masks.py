import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from pipeline.model.structure import StructureError, discover, structure_from_config
from pipeline.pruning.masks import Masks


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_discover_reads_config(make_model, arch: str):
    model = AutoModelForCausalLM.from_pretrained(make_model(arch))
    s = discover(model)
    assert (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim, s.intermediate_size) == (2, 8, 4, 8, 96)
    assert s.heads_per_group == 2 and s.head_units == 4
    assert s.attn_bias == (arch == "qwen2")
    # Prunable params equal the projections' weights (and q/k/v biases) counted from the model.
    counted = sum(
        p.numel()
        for n, p in model.named_parameters()
        if any(k in n for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    )
    assert s.prunable_params == counted


def test_unknown_architecture_is_refused():
    from transformers import GPT2Config

    with pytest.raises(StructureError, match="no known prunable structure|lacks"):
        structure_from_config(GPT2Config(n_layer=1), "kv_group")


def _logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_masks_equal_removing_columns(make_model, arch: str):
    """Masking a KV group / a channel computes what zeroing its o_proj / down_proj columns computes."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(make_model(arch)).eval()
    s = discover(model)
    x = torch.randint(0, 500, (2, 16))
    masks = Masks(s)
    masks.attach(model)
    heads = torch.ones(2, 4, dtype=torch.bool)
    heads[1, 2] = False
    chans = torch.ones(2, 96, dtype=torch.bool)
    chans[0, :40] = False
    masks.set_units(heads, chans)
    masked = _logits(model, x)
    masks.detach_hooks()
    with torch.no_grad():
        o = model.model.layers[1].self_attn.o_proj.weight
        o[:, 2 * 2 * 8 : 3 * 2 * 8] = 0  # query heads 4 and 5 belong to KV group 2
        model.model.layers[0].mlp.down_proj.weight[:, :40] = 0
    torch.testing.assert_close(masked, _logits(model, x), rtol=0, atol=1e-6)
    # Parameter accounting: one KV group (2 q heads + its k/v) and 40 channels.
    group = 2 * 8 * 64 * 2 + 2 * 8 * 64 + s.attn_bias * (2 * 8 + 2 * 8)
    assert masks.pruned_params() == group + 40 * 3 * 64


def test_masks_cut_the_lora_path_too(make_model):
    """On a PEFT model the mask sits before o_proj / down_proj, so it removes the LoRA contribution of a
    pruned unit as well: masked logits equal zeroing its input columns in the base weight and in lora_A."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(make_model("llama")).eval()
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["o_proj", "down_proj"]))
    for name, p in peft.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapters matter
            torch.nn.init.normal_(p, std=0.5)
    masks = Masks(discover(peft))
    masks.attach(peft)
    x = torch.randint(0, 500, (1, 8))
    heads = torch.ones(2, 4, dtype=torch.bool)
    heads[1, 2] = False  # query heads 4 and 5: o_proj input columns 32:48
    chans = torch.ones(2, 96, dtype=torch.bool)
    chans[0, :40] = False
    masks.set_units(heads, chans)
    masked = _logits(peft, x)
    masks.detach_hooks()
    layers = peft.base_model.model.model.layers
    o, down = layers[1].self_attn.o_proj, layers[0].mlp.down_proj
    with torch.no_grad():
        o.base_layer.weight[:, 32:48] = 0
        down.base_layer.weight[:, :40] = 0
    base_only = _logits(peft, x)  # the adapters still read the pruned units
    assert (base_only - masked).abs().max() > 1e-3
    with torch.no_grad():
        o.lora_A["default"].weight[:, 32:48] = 0
        down.lora_A["default"].weight[:, :40] = 0
    torch.testing.assert_close(masked, _logits(peft, x), rtol=0, atol=1e-6)
