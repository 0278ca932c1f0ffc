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


class UncertaintyWeighting(torch.nn.Module):
    """Learned weights of the two loss terms (Kendall, Gal & Cipolla 2018, "Multi-task learning
    using uncertainty to weigh losses"): with one learned log-variance ``s`` per term,
    ``0.5 * exp(-s_d) * denoise + exp(-s_s) * seg + 0.5 * (s_d + s_s)`` (the regression and the
    classification form). A term's weight falls as its loss stays high, so neither scale is guessed.
    A batch without labelled patches has no segmentation term, so its ``s_s`` gets no push either."""

    def __init__(self) -> None:
        super().__init__()
        self.log_variances = torch.nn.Parameter(torch.zeros(2))

    def forward(self, denoise_term: torch.Tensor, seg_term: torch.Tensor, seg_present: torch.Tensor) -> torch.Tensor:
        """The weighted total; ``seg_present``: a bool tensor, whether the batch had labelled patches."""
        s_denoise, s_seg = self.log_variances[0], self.log_variances[1]
        seg = (torch.exp(-s_seg) * seg_term + 0.5 * s_seg) * seg_present.to(s_seg.dtype)
        return 0.5 * torch.exp(-s_denoise) * denoise_term + 0.5 * s_denoise + seg

    def weights(self) -> tuple[float, float]:
        """The current weights of ``(denoise, seg)``, for the log."""
        denoise, seg = torch.exp(-self.log_variances.detach().float()).tolist()
        return 0.5 * denoise, seg
