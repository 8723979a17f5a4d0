import pytest
import torch

from pipeline.pruning.selection import WidthRules, decide, select_global, select_uniform, width_rule_problems


def test_global_counts_and_never_resurrects():
    torch.manual_seed(0)
    scores = torch.rand(4, 10, dtype=torch.float64)
    alive = torch.ones(4, 10, dtype=torch.bool)
    keep1 = select_global(scores, alive, 0.25, max_layer_sparsity=0.9)
    assert (~keep1).sum() == 10
    # Scores change completely: the units pruned before must stay pruned.
    keep2 = select_global(torch.rand(4, 10, dtype=torch.float64) + 5 * (~keep1), keep1, 0.5, 0.9)
    assert (~keep2).sum() == 20
    assert not (keep2 & ~keep1).any()


def test_global_prunes_lowest_across_layers_with_a_cap():
    scores = torch.tensor([[0.1, 0.2, 0.3, 0.4], [5.0, 6.0, 7.0, 8.0]], dtype=torch.float64)
    keep = select_global(scores, torch.ones(2, 4, dtype=torch.bool), 0.5, max_layer_sparsity=0.5)
    # Layer 0 holds the 4 lowest but may lose at most half of its units.
    assert keep.tolist() == [[False, False, True, True], [False, False, True, True]]
    keep = select_global(scores, torch.ones(2, 4, dtype=torch.bool), 0.375, max_layer_sparsity=0.75)
    assert keep.tolist() == [[False, False, False, True], [True, True, True, True]]


def test_uniform_and_query_groups():
    torch.manual_seed(1)
    scores = torch.rand(3, 8, dtype=torch.float64)
    alive = torch.ones(3, 8, dtype=torch.bool)
    keep = select_uniform(scores, alive, 0.5)
    assert keep.sum(-1).tolist() == [4, 4, 4]
    keep_q = select_uniform(scores, alive, 0.5, groups=4)  # 4 KV groups of 2 query heads
    assert keep_q.view(3, 4, 2).sum(-1).eq(1).all()
    # Never all units of a group/layer, whatever the fraction.
    assert select_uniform(scores, alive, 0.99, groups=4).view(3, 4, 2).sum(-1).ge(1).all()


def test_decide_breaks_ties_by_position_and_honours_the_layer_cap():
    """All-equal scores (LoRA B starts at zero): the cut is the first units in (layer, unit) order, a
    layer never loses more than the cap."""
    zeros = torch.zeros(2, 4, dtype=torch.float64)
    alive = torch.ones(2, 4, dtype=torch.bool)
    heads, channels = decide(zeros, zeros.clone(), alive, alive.clone(), 0.5, "global", 0.5)
    # 4 of 8 units go; each layer may lose at most floor(0.5 * 4) = 2, so both layers lose their first two.
    assert heads.tolist() == [[False, False, True, True], [False, False, True, True]]
    assert torch.equal(heads, channels)
    heads, _ = decide(zeros, zeros, alive, alive, 0.5, "global", 0.9)
    # Cap 3: layer 0 loses units 0-2 (its best unit is protected), then layer 1 its first unit.
    assert heads.tolist() == [[False, False, False, True], [False, True, True, True]]
    heads, _ = decide(zeros, zeros, alive, alive, 0.5, "uniform", 0.9, query_groups=2)
    # Uniform over 2 KV groups of 2 query heads: the first head of every group.
    assert heads.tolist() == [[False, True, False, True], [False, True, False, True]]


# ------------------------------------------------------------------------------ serving width rules

L, K, HPG, INTER, HID, D = 6, 4, 2, 768, 256, 32  # the shared vimdoc model's shapes
P_HEAD, P_CH = HPG * D * HID * 2 + 2 * D * HID, 3 * HID


def _ramp(rules, scope="global", steps=(0.1, 0.25, 0.4, 0.5)):
    """Decisions along a schedule ending at rules.target, on fresh random scores each time."""
    g = torch.Generator().manual_seed(0)
    h_alive, c_alive = torch.ones(L, K, dtype=torch.bool), torch.ones(L, INTER, dtype=torch.bool)
    for f in steps:
        hs, cs = (
            torch.rand(L, K, generator=g, dtype=torch.float64),
            torch.rand(L, INTER, generator=g, dtype=torch.float64),
        )
        keep_h, keep_c = decide(hs, cs, h_alive, c_alive, f, scope, 0.9, 1, rules)
        assert not (keep_h & ~h_alive).any() and not (keep_c & ~c_alive).any()  # nothing comes back
        h_alive, c_alive = keep_h, keep_c
    return h_alive, c_alive


def _pruned_fraction(h_alive, c_alive):
    pruned = (~h_alive).sum().item() * P_HEAD + (~c_alive).sum().item() * P_CH
    return pruned / (L * (K * P_HEAD + INTER * P_CH))


@pytest.mark.parametrize("scope", ["global", "uniform"])
@pytest.mark.parametrize(("round_to", "multiple"), [(64, 0), (100, 0), (1, 2), (64, 4), (128, 1)])
def test_width_rules_are_honoured_and_reach_the_target(scope, round_to, multiple):
    rules = WidthRules(round_to, multiple, 0.5, P_HEAD, P_CH)
    h_alive, c_alive = _ramp(rules, scope)
    kept_ch = c_alive.sum(-1)
    assert ((kept_ch % round_to == 0) | (kept_ch == INTER)).all(), kept_ch
    kept_kv = h_alive.sum(-1)
    if multiple:
        assert kept_kv.unique().numel() == 1 and kept_kv[0] % multiple == 0, kept_kv
    # Within one rounding unit (a block of channels in every layer for uniform, one block for global).
    unit = round_to * P_CH * (L if scope == "uniform" else 1) / (L * (K * P_HEAD + INTER * P_CH))
    assert abs(_pruned_fraction(h_alive, c_alive) - 0.5) <= unit + 1e-9, (_pruned_fraction(h_alive, c_alive), unit)


def test_kv_multiple_of_all_heads_moves_the_cut_to_the_mlp():
    rules = WidthRules(1, 4, 0.5, P_HEAD, P_CH)
    h_alive, c_alive = _ramp(rules)
    assert h_alive.all() and abs(_pruned_fraction(h_alive, c_alive) - 0.5) < 1e-4


def test_infeasible_width_rules_are_named():
    rules = WidthRules(1, 4, 0.7, P_HEAD, P_CH)  # all heads kept: 0.7 needs > 90% of the channels
    (msg,) = width_rule_problems(K, INTER, rules, "global", "kv_group", 0.9)
    assert msg.startswith("pruning.kv_heads_multiple_of=4: every layer keeps 4 of 4 KV heads") and "channels" in msg
    assert width_rule_problems(K, INTER, WidthRules(1, 2, 0.7, P_HEAD, P_CH), "global", "kv_group", 0.9) == []
    assert (
        "exceeds the model's intermediate_size"
        in width_rule_problems(K, 64, WidthRules(128), "global", "kv_group", 0.9)[0]
    )
    assert "not a multiple of 3" in width_rule_problems(K, INTER, WidthRules(1, 3, 0.5), "uniform", "query", 0.9)[0]


def test_global_blocks_keep_a_prefix_of_the_best():
    scores = torch.arange(20, dtype=torch.float64).view(2, 10)  # layer 0 holds the lowest scores
    keep = select_global(scores, torch.ones(2, 10, dtype=torch.bool), 0.4, 0.9, round_to=4)
    # Blocks per layer: its worst 10 % 4 = 2 units, then 4 more. 8 to cut: layer 0's two blocks (its
    # 6 worst), then layer 1's first; each layer keeps a multiple of 4.
    assert keep.sum(-1).tolist() == [4, 8] and keep[0].tolist() == [False] * 6 + [True] * 4


def test_auto_round_to():
    # pruning.round_to=0: 64 channels per block on real widths, finer where a layer would get < 8 blocks.
    from pipeline.pruning.selection import auto_round_to

    got = {n: auto_round_to(n) for n in (8192 * 3, 28672, 1536, 768, 512, 511, 128, 64, 16, 8, 7, 1)}
    assert got == {24576: 64, 28672: 64, 1536: 64, 768: 64, 512: 64, 511: 32, 128: 16, 64: 8, 16: 2, 8: 1, 7: 1, 1: 1}
