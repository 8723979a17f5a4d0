"""The real CLI on tiny models: ZeRO-3 over gloo with an NF4 base, 1 process and 2 ranks."""

from pathlib import Path

import pytest
import torch
from conftest import read_summary, run_pipeline, write_config
from safetensors.torch import load_file

import pipeline

pytestmark = pytest.mark.distributed


def _check_ok(proc, out: Path) -> dict:
    assert proc.returncode == 0, f"run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return read_summary(out)


@pytest.fixture(scope="module", params=["lora", "taylor", "full_grad"])
def equivalent_runs(request, make_model, tmp_path_factory):
    """The same global batches (2 windows x 2) as 1 process x 2 micro-batches and as 2 ranks x 1."""
    crit = request.param
    quantization = "none" if crit == "full_grad" else "nf4"  # the full-gradient reference needs the fp32 base
    tmp = tmp_path_factory.mktemp(f"eq-{crit}")
    model = make_model("llama")
    runs = {}
    for name, ranks, gas in (("one", 1, 2), ("two", 2, 1)):
        out = tmp / name
        cfg = write_config(
            tmp / f"{name}.yaml",
            model,
            out,
            pruning={"criterion": crit, "normalize": "none"},
            train={"grad_accum": gas},
            model={"quantization": quantization},
        )
        runs[name] = (out, _check_ok(run_pipeline(cfg, ranks=ranks), out))
    return runs


def test_two_rank_scores_equal_single_process(equivalent_runs):
    (one, s1), (two, s2) = equivalent_runs["one"], equivalent_runs["two"]
    assert s1["world_size"] == 1 and s2["world_size"] == 2 and s1["global_batch"] == s2["global_batch"] == 4
    a, b = load_file(one / "scores.safetensors"), load_file(two / "scores.safetensors")
    assert int(a["scores.events"]) == int(b["scores.events"]) > 1
    for key in ("scores.heads", "scores.channels"):
        assert a[key].abs().max() > 0
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-12)
    ma, mb = load_file(one / "masks.safetensors"), load_file(two / "masks.safetensors")
    assert torch.equal(ma["heads"], mb["heads"]) and torch.equal(ma["channels"], mb["channels"])


def test_run_dir_contract(equivalent_runs, make_model):
    out, summary = equivalent_runs["two"]
    # 0.5 of the prunable parameters, within one unit of each kind.
    s = summary["structure"]
    unit = max(2 * 8 * 64 * 2 + 2 * 8 * 64, 3 * 64)
    assert abs(summary["pruned_params"] - 0.5 * summary["prunable_params"]) <= unit
    assert summary["scheduled_sparsity_final"] == 0.5
    masks = load_file(out / "masks.safetensors")
    assert masks["heads"].shape == (s["num_layers"], s["num_attention_heads"])
    assert masks["heads"].sum(-1).tolist() == summary["kept_heads_per_layer"]
    assert masks["channels"].sum(-1).tolist() == summary["kept_channels_per_layer"]
    for k in ("eval_ppl_before", "eval_ppl_after", "train_loss_final"):
        assert summary[k] == summary[k] and summary[k] > 0  # finite, not NaN
    assert (out / "resolved_config.yaml").is_file() and list((out / "tb").glob("events.out.tfevents.*"))
    # The code and the compute dtype that produced the run ("auto" resolved; export replays NF4 in it).
    assert summary["compute_dtype"] == "fp32" and summary["version"] == pipeline.__version__
    # The adapter holds real tensors (not empty ZeRO-3 shards) and loads in PEFT.
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    b_keys = [k for k in adapter if "lora_B" in k]
    assert len(b_keys) == 2 * 7 and all(adapter[k].numel() > 0 for k in adapter)
    assert sum(adapter[k].abs().sum() for k in b_keys) > 0  # trained away from the zero init
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(make_model("llama"))
    peft = PeftModel.from_pretrained(base, out / "adapter")
    q = peft.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    key = next(k for k in b_keys if "layers.0.self_attn.q_proj" in k)
    torch.testing.assert_close(q.detach(), adapter[key])


@pytest.mark.parametrize("criterion", ["magnitude", "random"])
def test_other_criteria_single_process(criterion, make_model, tmp_path):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", make_model("llama"), out, pruning={"criterion": criterion})
    summary = _check_ok(run_pipeline(cfg), out)
    assert summary["achieved_sparsity"] == pytest.approx(0.5, abs=0.03)


def test_qwen2_uniform_query_heads_two_ranks(make_model, tmp_path):
    out = tmp_path / "out"
    cfg = write_config(
        tmp_path / "c.yaml",
        make_model("qwen2"),
        out,
        pruning={"scope": "uniform", "head_unit": "query"},
        model={"quantization": "none"},
    )
    summary = _check_ok(run_pipeline(cfg, ranks=2), out)
    heads = load_file(out / "masks.safetensors")["heads"]
    assert heads.view(2, 4, 2).sum(-1).eq(1).all()  # one query head kept in every KV group
    assert len(set(summary["kept_channels_per_layer"])) == 1
