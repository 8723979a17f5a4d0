"""pruning.mask_grad_mix: the LoRA-guided score plus the exact mask gradient, each over its mean."""

from __future__ import annotations

import pytest
import torch

from pipeline.config.schema import ConfigError, load_config
from pipeline.pruning.aggregation import mix_mask_grad
from pipeline.pruning.selection import decide


def test_mix_is_the_sum_of_mean_normalised_signals() -> None:
    lora = torch.tensor([[1.0, 3.0], [2.0, 2.0]], dtype=torch.float64)  # mean 2
    grad = torch.tensor([[0.0, 10.0], [30.0, 0.0]], dtype=torch.float64)  # mean 10
    want = torch.tensor([[0.5 + 0.0, 1.5 + 1.0], [1.0 + 3.0, 1.0 + 0.0]], dtype=torch.float64)
    assert torch.allclose(mix_mask_grad(lora, grad, 1.0), want)
    assert torch.allclose(mix_mask_grad(lora, grad, 0.0), lora / 2)  # 0: LoRA scores alone (same ranking)
    # Scale of either signal does not matter, only its shape.
    assert torch.allclose(mix_mask_grad(lora * 1e6, grad * 1e-9, 0.5), mix_mask_grad(lora, grad, 0.5))
    zeros = torch.zeros_like(grad)
    assert torch.allclose(mix_mask_grad(lora, zeros, 1.0), lora / 2)


def test_mix_moves_the_cut_to_what_the_mask_gradient_says() -> None:
    """LoRA says layer 0 is least important; a mask gradient that says layer 1 is wins with weight 1."""
    lora = torch.tensor([[1.0, 1.0, 4.0, 4.0], [2.0, 2.0, 4.0, 4.0]], dtype=torch.float64)
    grad = torch.tensor([[9.0, 9.0, 9.0, 9.0], [0.0, 0.0, 9.0, 9.0]], dtype=torch.float64)
    alive = torch.ones_like(lora, dtype=torch.bool)
    before, _ = decide(lora, lora, alive, alive, 0.25, "global", 0.9)
    after, _ = decide(mix_mask_grad(lora, grad, 1.0), lora, alive, alive, 0.25, "global", 0.9)
    assert before.tolist() == [[False, False, True, True], [True, True, True, True]]
    assert after.tolist() == [[True, True, True, True], [False, False, True, True]]


def test_negative_mix_is_rejected(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"pruning.mask_grad_mix=-1.0: must be >= 0"):
        load_config(None, ["model.path=x", "pruning.mask_grad_mix=-1"])
