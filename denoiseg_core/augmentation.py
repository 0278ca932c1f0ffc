"""Augmentations of training batches on the device (after the patch sampler's rotations and flips).

:func:`elastic_deform` warps chosen patches and their targets with one smooth random
displacement field per patch (``training.elastic_deformation``). It runs on whole batches
without a host sync: unchosen patches get a zero field and are returned unchanged.
:func:`add_noise` adds pixel-wise Gaussian noise of a random strength to chosen patches
(``training.noise_augmentation``), so the labelled crops are seen at more noise levels than
the few they were recorded at.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: control points per axis of the random displacement field (a smooth field over a 64-pixel patch)
CONTROL_POINTS = 4


def elastic_deform(
    patches: torch.Tensor,
    targets: torch.Tensor,
    chosen: torch.Tensor,
    magnitude: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp ``patches`` ``(B, C, *spatial)`` and ``targets`` (``(B, *spatial)`` or ``(B, K, *spatial)``)
    where ``chosen`` (bool ``(B,)``) is True.

    Displacements (pixels) are drawn normal with standard deviation ``magnitude`` on a grid of
    :data:`CONTROL_POINTS` per axis and interpolated smoothly over the patch. Images are
    resampled linearly; integer targets (class maps) by nearest neighbour so they stay classes,
    float targets linearly. Edges reflect.
    """
    spatial = patches.shape[2:]
    ndim = len(spatial)
    if ndim not in (2, 3):
        raise ValueError(f"elastic deformation needs 2D or 3D patches, got {tuple(patches.shape)}")
    device = patches.device
    batch = patches.shape[0]
    coarse = torch.randn((batch, ndim, *([CONTROL_POINTS] * ndim)), generator=generator, device=generator.device)
    coarse = coarse.to(device) * magnitude * chosen.to(device=device, dtype=torch.float32).view(-1, *([1] * (ndim + 1)))
    field = F.interpolate(coarse, size=tuple(spatial), mode="bicubic" if ndim == 2 else "trilinear", align_corners=True)
    axes = [torch.linspace(-1.0, 1.0, size, device=device) for size in spatial]
    identity = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (*spatial, ndim), axis order z, y, x
    to_normalised = torch.tensor([2.0 / max(1, size - 1) for size in spatial], device=device)
    # grid_sample takes coordinates x first
    grid = (identity + field.movedim(1, -1) * to_normalised).flip(-1)
    warped = F.grid_sample(patches.float(), grid, mode="bilinear", padding_mode="reflection", align_corners=True)
    keep_batch_view = (-1,) + (1,) * (patches.ndim - 1)
    patches = torch.where(chosen.to(device).view(keep_batch_view), warped.to(patches.dtype), patches)

    per_channel = targets.ndim == patches.ndim  # (B, K, *spatial) rather than (B, *spatial)
    target_in = targets if per_channel else targets.unsqueeze(1)
    integer = not targets.is_floating_point()
    warped_target = F.grid_sample(
        target_in.float(), grid, mode="nearest" if integer else "bilinear", padding_mode="reflection", align_corners=True
    )
    if integer:
        warped_target = warped_target.round()
    warped_target = warped_target.to(targets.dtype)
    if not per_channel:
        warped_target = warped_target.squeeze(1)
    targets = torch.where(chosen.to(targets.device).view((-1,) + (1,) * (targets.ndim - 1)), warped_target, targets)
    return patches, targets


def add_noise(patches: torch.Tensor, chosen: torch.Tensor, max_sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``patches`` ``(B, C, *spatial)`` with pixel-wise Gaussian noise added where ``chosen`` (bool ``(B,)``)
    is True; each chosen patch draws its standard deviation uniformly from ``[0, max_sigma]``."""
    keep_batch_view = (-1,) + (1,) * (patches.ndim - 1)
    sigma = torch.rand(patches.shape[0], generator=generator, device=generator.device) * max_sigma
    sigma = sigma.to(patches.device) * chosen.to(device=patches.device, dtype=torch.float32)
    noise = torch.randn(patches.shape, generator=generator, device=generator.device).to(patches.device)
    return patches + (noise * sigma.view(keep_batch_view)).to(patches.dtype)
