"""The DenoiSeg loss: Noise2Void masked MSE plus the head's segmentation loss.

``total = alpha * denoise + (1 - alpha) * segmentation`` (Buchholz et al. 2020). The
denoising term uses every patch (it is self-supervised); the segmentation term only the
labelled ones, as the head decides.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from denoiseg_core.components import SegmentationHead


def n2v_masked_mse(prediction: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the pixels where ``loss_mask`` is True.

    ``prediction`` is the network output for the masked input, ``target`` the unmasked
    noisy input (same shape). With no masked pixel the result is a zero that is still
    part of the graph. Computed in float32 so it is safe under bf16 autocast.
    """
    mask = loss_mask.to(dtype=torch.float32)
    squared = (prediction.float() - target.float()) ** 2
    return (squared * mask).sum() / mask.sum().clamp(min=1.0)


def labelled_weighted_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, labelled: torch.Tensor, class_weights: Sequence[float]
) -> torch.Tensor:
    """Class-weighted cross-entropy, the mean over all pixels of the labelled patches.

    Each pixel's term is ``weight[target] * -log p(target)``, averaged over pixels (not
    normalised by the weights, so e.g. a border weight of 5 raises the loss as in DenoiSeg).
    Unlabelled patches are weighted out rather than indexed away, so there is no
    device-to-host sync; with none labelled the result is a zero that is still in the graph.
    Heads with a softmax over classes use this for their loss term.
    """
    weight = torch.as_tensor(class_weights, dtype=torch.float32, device=logits.device)
    targets = targets.to(logits.device).long()
    keep = labelled.to(device=logits.device, dtype=torch.bool).view(-1, *([1] * (targets.ndim - 1))).expand_as(targets)
    # Targets of unlabelled patches are never looked at (they may hold anything).
    safe_targets = torch.where(keep, targets, torch.zeros_like(targets))
    per_pixel = F.cross_entropy(logits.float(), safe_targets, weight=weight, reduction="none")
    keep = keep.to(per_pixel.dtype)
    return (per_pixel * keep).sum() / keep.sum().clamp(min=1.0)


def denoiseg_loss(
    denoised: torch.Tensor,
    original: torch.Tensor,
    loss_mask: torch.Tensor,
    seg_logits: torch.Tensor,
    targets: torch.Tensor,
    labelled: torch.Tensor,
    head: SegmentationHead,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training loss of one batch.

    Args:
        denoised: denoised channels of the network output, ``(N, C, *spatial)``.
        original: the unmasked (noisy, normalised) input patches, same shape.
        loss_mask: bool, True at the blind-spot pixels, same shape.
        seg_logits: segmentation logits, ``(N, head.num_classes, *spatial)``.
        targets: a batch of ``head.targets``, ``(N, *target shape)`` of the dtype ``head.target`` declares.
        labelled: bool ``(N,)``, False for patches without annotation.
        head: the segmentation head providing the segmentation loss.
        alpha: weight of the denoising term, in [0, 1].

    Returns:
        ``(total, denoise_term, seg_term)``; log the terms detached.
    """
    denoise_term = n2v_masked_mse(denoised, original, loss_mask)
    seg_term = head.loss(seg_logits, targets, labelled)
    total = alpha * denoise_term + (1.0 - alpha) * seg_term
    return total, denoise_term, seg_term
