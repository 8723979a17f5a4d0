"""pruning.layer_share=mask_grad: LoRA scores order units within a layer; |dL/dm| sets each layer's total."""

from __future__ import annotations

import torch

from pipeline.aggregation import rescale_layers
from pipeline.selection import decide


def test_rescale_keeps_order_within_layers_and_takes_totals() -> None:
    g = torch.Generator().manual_seed(0)
    lora = torch.rand(4, 16, generator=g, dtype=torch.float64)
    share = torch.rand(4, 16, generator=g, dtype=torch.float64) * torch.tensor([[10.0], [1.0], [0.1], [3.0]])
    out = rescale_layers(lora, share)
    assert torch.allclose(out.sum(1), share.sum(1))
    assert torch.equal(out.argsort(1), lora.argsort(1))
    zero = rescale_layers(torch.zeros(2, 3, dtype=torch.float64), share[:2, :3])
    assert torch.equal(zero, torch.zeros(2, 3, dtype=torch.float64))


def test_layer_share_moves_the_cut_between_layers() -> None:
    """The LoRA scores say layer 0 is least important; the mask gradient says layer 1 is: the cut follows it."""
    lora = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]], dtype=torch.float64)
    share = torch.tensor([[100.0, 0, 0, 0], [1.0, 0, 0, 0]], dtype=torch.float64)
    alive = torch.ones_like(lora, dtype=torch.bool)
    before, _ = decide(lora, lora, alive, alive, 0.25, "global", 0.9)
    after, _ = decide(rescale_layers(lora, share), lora, alive, alive, 0.25, "global", 0.9)
    assert before.tolist() == [[False, False, True, True], [True, True, True, True]]
    assert after.tolist() == [[True, True, True, True], [False, False, True, True]]
