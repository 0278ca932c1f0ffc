"""The DenoiSeg loss: masked MSE and the alpha-weighted combination."""

from __future__ import annotations

import pytest
import torch

from denoiseg_core.losses import denoiseg_loss, n2v_masked_mse
from denoiseg_plugins.three_class_head import ThreeClassHead


def test_masked_mse_counts_masked_pixels_only():
    prediction = torch.zeros(1, 1, 2, 3, requires_grad=True)
    target = torch.tensor([[[[1.0, 2.0, 100.0], [3.0, -50.0, 7.0]]]])
    mask = torch.tensor([[[[True, True, False], [True, False, False]]]])
    loss = n2v_masked_mse(prediction, target, mask)
    assert loss.item() == pytest.approx((1 + 4 + 9) / 3)
    loss.backward()
    assert torch.equal(prediction.grad != 0, mask)


def test_masked_mse_without_masked_pixels_is_differentiable_zero():
    prediction = torch.randn(2, 1, 4, 4, requires_grad=True)
    loss = n2v_masked_mse(prediction, torch.randn(2, 1, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(prediction.grad, torch.zeros_like(prediction))


def test_masked_mse_is_float32_for_bf16_input():
    prediction = torch.ones(1, 1, 4, 4, dtype=torch.bfloat16)
    loss = n2v_masked_mse(prediction, torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4, dtype=torch.bool))
    assert loss.dtype == torch.float32 and loss.item() == 1.0


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_denoiseg_loss_combines_terms(alpha):
    head = ThreeClassHead()
    denoised = torch.zeros(2, 1, 4, 4, requires_grad=True)
    original = torch.full((2, 1, 4, 4), 2.0)
    loss_mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    loss_mask[:, :, 0, 0] = True
    seg_logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    targets = torch.randint(0, 3, (2, 4, 4))
    labelled = torch.tensor([True, False])
    total, denoise_term, seg_term = denoiseg_loss(
        denoised, original, loss_mask, seg_logits, targets, labelled, head, alpha
    )
    assert denoise_term.item() == pytest.approx(4.0)
    assert seg_term.item() == pytest.approx(head.loss(seg_logits, targets, labelled).item())
    assert total.item() == pytest.approx(alpha * 4.0 + (1 - alpha) * seg_term.item(), rel=1e-6)
    total.backward()
    assert (denoised.grad.abs().sum() > 0) == (alpha > 0)
    assert (seg_logits.grad.abs().sum() > 0) == (alpha < 1)
