import torch

from pipeline.selection import decide, select_global, select_uniform


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


def test_decide_is_deterministic_on_ties():
    zeros = torch.zeros(2, 4, dtype=torch.float64)
    a = decide(zeros, zeros, zeros.bool().logical_not(), zeros.bool().logical_not(), 0.5, "global", 0.9)
    b = decide(zeros.clone(), zeros.clone(), zeros.bool().logical_not(), zeros.bool().logical_not(), 0.5, "global", 0.9)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=False))
