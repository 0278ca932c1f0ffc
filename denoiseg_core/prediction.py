"""Inference: tiled prediction of whole images and the glue to instance labels.

Large images are cut into overlapping tiles whose starts lie on the backbone's size
divisor (so a U-Net's pooling grid is the same as for the whole image) and which overlap
by at least ``2 * halo`` pixels (so every kept pixel is at least ``halo`` away from a tile
edge that is not an image edge). With a correct ``halo`` the tiled result equals
whole-image inference up to floating-point rounding.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import nn

from denoiseg_core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from denoiseg_core.checkpoint import LoadedModel

#: images with at most this many pixels (voxels) are predicted in one piece when no tile is given
WHOLE_IMAGE_PIXEL_LIMIT = 1024 * 1024

#: tile sizes used by ``tile="auto"`` (before rounding up to the size divisor)
DEFAULT_TILES: dict[int, tuple[int, ...]] = {2: (256, 256), 3: (32, 128, 128)}

Slices = tuple[slice, ...]


@dataclass
class Prediction:
    """The network output for one image."""

    #: ``(C, *spatial)`` float32 denoised image in raw intensity units (de-normalised)
    denoised: np.ndarray
    #: ``(K, *spatial)`` float32 segmentation probabilities of the head's classes
    probabilities: np.ndarray


class TilePlacement(NamedTuple):
    """One tile: where it is read from the padded image, and which part of it is kept.

    ``input`` indexes the padded image, ``output`` the unpadded output image and ``crop``
    the tile itself; ``tile[crop]`` is written to ``output_image[output]``.
    """

    input: Slices
    output: Slices
    crop: Slices


def round_up(value: int, divisor: int) -> int:
    return int(math.ceil(value / divisor) * divisor)


def padded_shape(shape: Sequence[int], divisor: int) -> tuple[int, ...]:
    """``shape`` with every dimension rounded up to a multiple of ``divisor``."""
    return tuple(round_up(int(s), divisor) for s in shape)


def _axis_plan(size: int, padded: int, tile: int, halo: int, divisor: int) -> list[tuple[int, int, int]]:
    """Tiles along one axis as ``(start, keep_from, keep_to)`` in padded coordinates.

    ``tile`` is already a multiple of ``divisor`` and at most ``padded``. Consecutive tiles
    overlap by ``>= 2 * halo``; the border between their kept parts is the middle of the
    overlap. Kept parts are clipped to the unpadded ``size``; empty ones are dropped.
    """
    if tile >= padded:
        starts = [0]
    else:
        stride = (tile - 2 * halo) // divisor * divisor
        if stride <= 0:  # the caller enlarges tiles so this cannot happen
            raise ValueError(f"tile {tile} too small for halo {halo} and divisor {divisor}")
        starts = list(range(0, padded - tile, stride)) + [padded - tile]
    borders = [0] + [(a + b + tile) // 2 for a, b in zip(starts[:-1], starts[1:])] + [padded]
    plan = []
    for index, start in enumerate(starts):
        keep_from, keep_to = borders[index], min(borders[index + 1], size)
        if keep_to > keep_from:
            plan.append((start, keep_from, keep_to))
    return plan


def effective_tile(shape: Sequence[int], tile: Sequence[int] | None, halo: int, divisor: int) -> tuple[int, ...]:
    """The tile size actually used: a multiple of ``divisor``, large enough that consecutive
    tiles can overlap by ``2 * halo`` while advancing by at least ``divisor``, and no larger
    than the image padded to the divisor."""
    padded = padded_shape(shape, divisor)
    if tile is None:
        return padded
    if len(tile) != len(shape):
        raise ConfigError(f"tile {tuple(tile)} has {len(tile)} dimensions but the image has {len(shape)}")
    if any(int(t) < 1 for t in tile):
        raise ConfigError(f"tile sizes must be positive, got {tuple(tile)}")
    smallest = round_up(2 * halo + divisor, divisor)
    return tuple(min(max(round_up(int(t), divisor), smallest), p) for t, p in zip(tile, padded))


def tile_plan(
    shape: Sequence[int], tile: Sequence[int] | None, halo: int, divisor: int
) -> list[TilePlacement]:
    """Plan tiled inference of an image of spatial ``shape``.

    The image is first padded (at the end of each axis) to a multiple of ``divisor``; every
    tile has the same size (see :func:`effective_tile`), starts on a multiple of ``divisor``
    and the kept parts of all tiles cover the unpadded image exactly once. ``tile=None``
    plans a single tile over the whole padded image.
    """
    shape = tuple(int(s) for s in shape)
    if any(s < 1 for s in shape):
        raise DataError(f"cannot tile an image of shape {shape}")
    padded = padded_shape(shape, divisor)
    size = effective_tile(shape, tile, halo, divisor)
    axes = [_axis_plan(s, p, t, halo, divisor) for s, p, t in zip(shape, padded, size)]
    placements = []
    for combination in np.ndindex(*(len(a) for a in axes)):
        chosen = [axes[dim][i] for dim, i in enumerate(combination)]
        placements.append(
            TilePlacement(
                input=tuple(slice(start, start + t) for (start, _, _), t in zip(chosen, size)),
                output=tuple(slice(lo, hi) for _, lo, hi in chosen),
                crop=tuple(slice(lo - start, hi - start) for start, lo, hi in chosen),
            )
        )
    return placements


def default_tile(ndim: int, divisor: int, halo: int = 0) -> tuple[int, ...]:
    """A tile size that fits comfortably in memory: 256x256 (2D) or 32x128x128 (3D), rounded up to ``divisor``.

    With a ``halo`` each side grows by ``2 * halo``, so that each tile still contributes
    about the base size (a depth-4 U-Net has a halo of 122 pixels; a bare 256 tile would
    keep only 16 pixels per axis).
    """
    if ndim not in DEFAULT_TILES:
        raise ValueError(f"no default tile for {ndim}-D images")
    return tuple(round_up(t + 2 * halo, divisor) for t in DEFAULT_TILES[ndim])


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``"auto"`` -> CUDA if available else CPU; ``None`` stays ``None`` (keep the network where it is)."""
    if device is None or isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return resolved


def _autocast(device: torch.device, precision: str):
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    if precision in ("bf16", "auto"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ConfigError(f"unknown precision {precision!r} (use fp32, bf16 or auto)")


def predict_array(
    net: nn.Module,
    image_normalised: np.ndarray,
    *,
    divisor: int,
    halo: int,
    tile: Sequence[int] | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    out_channels: int | None = None,
) -> np.ndarray:
    """Run ``net`` (``(N, C, *s) -> (N, K, *s)``) over one ``(C, *spatial)`` image, tiled.

    The image is reflect-padded to a multiple of ``divisor``; ``tile=None`` runs it whole.
    Tiles go through the network ``batch_size`` at a time and their kept centres are
    written into one preallocated ``(K, *spatial)`` float32 array, so memory stays bounded
    by the image plus one batch. ``device=None`` runs where the network's parameters are;
    otherwise the network is moved there. ``precision="bf16"`` uses bfloat16 autocast,
    ``"auto"`` does so on CUDA only. The network is used as is (put it in eval mode first).
    """
    image = np.asarray(image_normalised, dtype=np.float32)
    if image.ndim < 3:
        raise ValueError(f"expected a (C, *spatial) image with 2 or 3 spatial axes, got shape {image.shape}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    spatial = image.shape[1:]
    target = resolve_device(device)
    if target is None:
        parameter = next(iter(net.parameters()), None)
        target = parameter.device if parameter is not None else torch.device("cpu")
    else:
        net.to(target)

    padded = padded_shape(spatial, divisor)
    padding = [(0, 0)] + [(0, p - s) for s, p in zip(spatial, padded)]
    # reflect keeps image statistics at the padded edge (zeros would look like a dark border)
    source = np.pad(image, padding, mode="reflect") if padded != tuple(spatial) else image
    placements = tile_plan(spatial, tile, halo, divisor)

    result: np.ndarray | None = None
    if out_channels is not None:
        result = np.empty((out_channels, *spatial), dtype=np.float32)
    with torch.inference_mode(), _autocast(target, precision):
        for first in range(0, len(placements), batch_size):
            batch = placements[first : first + batch_size]
            inputs = np.stack([source[(slice(None), *p.input)] for p in batch])
            outputs = net(torch.from_numpy(inputs).to(target)).float().cpu().numpy()
            if result is None:
                result = np.empty((outputs.shape[1], *spatial), dtype=np.float32)
            elif outputs.shape[1] != result.shape[0]:
                raise ValueError(f"network produced {outputs.shape[1]} channels, expected {result.shape[0]}")
            for placement, output in zip(batch, outputs):
                result[(slice(None), *placement.output)] = output[(slice(None), *placement.crop)]
    assert result is not None  # the plan always has at least one tile
    return result


def choose_tile(
    tile: Sequence[int] | str | None, spatial: Sequence[int], divisor: int, halo: int = 0
) -> tuple[int, ...] | None:
    """Resolve the ``tile`` argument of :func:`predict_image` (None, "auto" or sizes)."""
    if isinstance(tile, str):
        if tile != "auto":
            raise ConfigError(f"tile must be 'auto' or a list of sizes, got {tile!r}")
        return default_tile(len(spatial), divisor, halo)
    if tile is None:
        small = math.prod(spatial) <= WHOLE_IMAGE_PIXEL_LIMIT
        return None if small else default_tile(len(spatial), divisor, halo)
    return tuple(int(t) for t in tile)


def predict_image(
    model: LoadedModel,
    image: np.ndarray,
    *,
    tile: Sequence[int] | str | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    precision: str = "fp32",
) -> Prediction:
    """Denoise and segment one raw ``(C, *spatial)`` image with a loaded model.

    ``tile``: ``None`` runs small images (up to 1024x1024 pixels) whole and tiles larger
    ones with :func:`default_tile` (grown to suit the halo); ``"auto"`` always uses it; a sequence
    gives the tile size. ``device=None`` runs where the model currently is (so a training
    loop can call this for validation); the network's train/eval mode is restored after.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != model.ndim + 1 or image.shape[0] != model.in_channels:
        raise DataError(
            f"image of shape {image.shape} does not match the model "
            f"({model.in_channels} channel(s), {model.ndim}-D)"
        )
    extra = (1,) * model.ndim
    mean = np.asarray(model.normalization.mean, dtype=np.float32).reshape(-1, *extra)
    std = np.asarray(model.normalization.std, dtype=np.float32).reshape(-1, *extra)
    divisor, halo = model.built.size_divisor, model.built.halo
    chosen_tile = choose_tile(tile, image.shape[1:], divisor, halo)

    was_training = model.built.net.training
    try:
        output = predict_array(
            model.inference_net(),  # sets eval mode
            (image - mean) / std,
            divisor=divisor,
            halo=halo,
            tile=chosen_tile,
            batch_size=batch_size,
            device=device,
            precision=precision,
            out_channels=model.in_channels + model.built.head.num_classes,
        )
    finally:
        model.built.net.train(was_training)
    denoised = output[: model.in_channels]
    denoised *= std
    denoised += mean
    return Prediction(denoised=denoised, probabilities=output[model.in_channels :])


def segment(model: LoadedModel, prediction: Prediction, threshold: float | None = None) -> np.ndarray:
    """Instance labels from a prediction, at ``threshold``, else the model's tuned threshold, else 0.5."""
    if threshold is None:
        threshold = model.threshold if model.threshold is not None else 0.5
    return model.head.instances(prediction.probabilities, float(threshold))
