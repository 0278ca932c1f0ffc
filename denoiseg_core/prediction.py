"""Inference: tiled prediction of whole images (instance labels and scores: :mod:`denoiseg_core.evaluation`).

Large images are cut into overlapping tiles whose starts lie on the backbone's size
divisor (so a U-Net's pooling grid is the same as for the whole image) and which overlap
by at least ``2 * halo`` pixels (so every kept pixel is at least ``halo`` away from a tile
edge that is not an image edge). With a correct ``halo`` the tiled result equals
whole-image inference up to floating-point rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import nn

from denoiseg_core.errors import ConfigError, DataError
from denoiseg_core.runtime import autocast, fold_batch_norm, preferred_memory_format, resolve_device

if TYPE_CHECKING:
    from denoiseg_core.data import Normalization
    from denoiseg_core.evaluation import EvaluatedModel

#: images with at most this many pixels (voxels) are predicted in one piece when no tile is given
WHOLE_IMAGE_PIXEL_LIMIT = 1024 * 1024

#: tile sizes used by ``tile="auto"`` (before rounding up to the size divisor)
DEFAULT_TILES: dict[int, tuple[int, ...]] = {2: (256, 256), 3: (32, 128, 128)}

#: kept (halo-free) tile sizes used when tiles are sized to the device: large tiles waste
#: less compute on overlapping halos; these fit a depth-4/32 U-Net well inside 4 GiB on a
#: CPU and inside a few GiB on a GPU (bf16 halves that)
DEVICE_TILES: dict[tuple[str, int], tuple[int, ...]] = {
    ("cpu", 2): (1024, 1024),
    ("cpu", 3): (64, 256, 256),
    ("cuda", 2): (2048, 2048),
    ("cuda", 3): (96, 384, 384),
}

#: most pixels (voxels) of tiles run through the network at once, per device type: with
#: large tiles the batch shrinks (to one tile) so activations stay within a few GiB
TILE_BATCH_PIXELS: dict[str, int] = {"cpu": 2**21, "cuda": 2**23}

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


def _padded_axis_index(size: int, padded: int) -> np.ndarray:
    """Source index of each position along a padded axis (reflect padding at the end, as
    ``np.pad(..., mode="reflect")`` would do, ``symmetric`` for a single pixel)."""
    mode = "reflect" if size > 1 else "symmetric"
    return np.pad(np.arange(size), (0, padded - size), mode=mode)


def _read_tile(
    image: np.ndarray, window: Slices, axis_index: list[np.ndarray], shift: np.ndarray | None, scale: np.ndarray | None
) -> np.ndarray:
    """One float32 ``(C, *tile)`` tile of the virtually padded (and normalised) image.

    Only the tile is copied: interior tiles are plain slices; tiles reaching into the
    padding gather their rows and columns through the reflect index."""
    if all(w.stop <= size for w, size in zip(window, image.shape[1:])):
        tile = image[(slice(None), *window)]
    else:
        tile = image[(slice(None), *np.ix_(*(index[w] for w, index in zip(window, axis_index))))]
    # a copy when normalising (never modify the caller's image); np.stack copies otherwise
    tile = tile.astype(np.float32, copy=shift is not None)
    if shift is not None:
        tile -= shift
        tile /= scale
    return tile


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
    normalization: Normalization | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Run ``net`` (``(N, C, *s) -> (N, K, *s)``) over one ``(C, *spatial)`` image, tiled.

    The image is reflect-padded to a multiple of ``divisor``; ``tile=None`` runs it whole.
    Tiles go through the network ``batch_size`` at a time and their kept centres are
    written into one preallocated ``(K, *spatial)`` float32 array, so memory stays bounded
    by the image, the output and one batch of tiles (at most :data:`TILE_BATCH_PIXELS`
    pixels, so large tiles go one at a time): the padding and (with a
    ``normalization``) the normalisation are applied tile by tile, never to a full-size copy. ``out`` is an
    optional preallocated ``(K, *spatial)`` float32 array (for instance a
    :func:`tiff_memmap`, to stream a large output to disk) that is filled and returned.

    ``device=None`` runs where the network's parameters are; otherwise the network is
    moved there. ``precision``: ``fp32``, ``bf16`` (autocast) or ``auto`` (see
    :func:`~denoiseg_core.runtime.resolve_precision`). The network runs in channels_last memory layout (faster
    convolutions; same weights) and, in eval mode, with its batch norms folded into the
    convolutions (:func:`~denoiseg_core.runtime.fold_batch_norm`, on a copy). Put it in eval mode first.
    """
    image = np.asarray(image_normalised)
    if image.dtype.kind not in "uif":
        raise ValueError(f"expected a numeric image, got {image.dtype}")
    if normalization is None and image.dtype != np.float32:
        image = image.astype(np.float32)
    if image.ndim < 3:
        raise ValueError(f"expected a (C, *spatial) image with 2 or 3 spatial axes, got shape {image.shape}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    spatial = image.shape[1:]
    target = resolve_device(device)
    if target is None:
        parameter = next(iter(net.parameters()), None)
        target = parameter.device if parameter is not None else torch.device("cpu")
    net = fold_batch_norm(net)  # a folded copy in eval mode; the caller's network is left as it is
    net.to(target)
    memory_format = preferred_memory_format(len(spatial), target)
    net.to(memory_format=memory_format)
    shift = scale = None
    if normalization is not None:
        shift, scale = normalization.arrays(len(spatial))

    padded = padded_shape(spatial, divisor)
    axis_index = [_padded_axis_index(s, p) for s, p in zip(spatial, padded)]
    placements = tile_plan(spatial, tile, halo, divisor)
    tile_pixels = math.prod(w.stop - w.start for w in placements[0].input)
    budget = TILE_BATCH_PIXELS.get(target.type)
    if budget is not None:
        batch_size = max(1, min(batch_size, budget // tile_pixels))

    result = out
    expected = out_channels if out_channels is not None else (out.shape[0] if out is not None else None)
    if result is not None and tuple(result.shape[1:]) != tuple(spatial):
        raise ValueError(f"out has shape {result.shape}, expected (K, {', '.join(map(str, spatial))})")
    if result is None and expected is not None:
        result = np.empty((expected, *spatial), dtype=np.float32)
    non_blocking = target.type == "cuda"
    with torch.inference_mode(), autocast(target, precision):
        for first in range(0, len(placements), batch_size):
            batch = placements[first : first + batch_size]
            inputs = torch.from_numpy(np.stack([_read_tile(image, p.input, axis_index, shift, scale) for p in batch]))
            if non_blocking:
                inputs = inputs.pin_memory()
            inputs = inputs.to(target, non_blocking=non_blocking).contiguous(memory_format=memory_format)
            outputs = net(inputs).float().cpu().numpy()
            if result is None:
                result = np.empty((outputs.shape[1], *spatial), dtype=np.float32)
            elif outputs.shape[1] != result.shape[0]:
                raise ValueError(f"network produced {outputs.shape[1]} channels, expected {result.shape[0]}")
            for placement, output in zip(batch, outputs):
                result[(slice(None), *placement.output)] = output[(slice(None), *placement.crop)]
            del inputs, outputs
    assert result is not None  # the plan always has at least one tile
    return result


def tiff_memmap(path: str | Path, shape: Sequence[int]) -> np.ndarray:
    """A new float32 TIFF at ``path`` opened as a writable memory map of ``shape``.

    Pass it as ``out`` to :func:`predict_array`/:func:`predict_image` to write a large
    output tile by tile without holding it in memory; flush with ``.flush()`` (or drop
    the last reference) when done. Refuses to overwrite an existing file.
    """
    import tifffile

    path = Path(path)
    if path.exists():
        raise DataError("output exists (refusing to overwrite)", path)
    return tifffile.memmap(
        path, shape=tuple(int(s) for s in shape), dtype=np.float32, bigtiff=True, photometric="minisblack"
    )


def device_tile(ndim: int, divisor: int, halo: int, device: torch.device | str) -> tuple[int, ...]:
    """A tile size for ``device``: :data:`DEVICE_TILES` (what each tile keeps) grown by the
    halo on both sides and rounded up to ``divisor``. Large tiles waste little compute on
    overlaps; memory stays bounded (a tile at a time, see :func:`predict_array`)."""
    kind = torch.device(device).type
    base = DEVICE_TILES.get((kind, ndim))
    if base is None:
        return default_tile(ndim, divisor, halo)
    return tuple(round_up(t + 2 * halo, divisor) for t in base)


def choose_tile(
    tile: Sequence[int] | str | None,
    spatial: Sequence[int],
    divisor: int,
    halo: int = 0,
    device: torch.device | str | None = None,
) -> tuple[int, ...] | None:
    """Resolve the ``tile`` argument of :func:`predict_image` (None, "auto" or sizes).

    ``"auto"`` (and ``None`` for images above :data:`WHOLE_IMAGE_PIXEL_LIMIT`) gives
    :func:`device_tile` when the ``device`` is known, else :func:`default_tile`.
    """
    def automatic() -> tuple[int, ...]:
        if device is None:
            return default_tile(len(spatial), divisor, halo)
        return device_tile(len(spatial), divisor, halo, device)

    if isinstance(tile, str):
        if tile != "auto":
            raise ConfigError(f"tile must be 'auto' or a list of sizes, got {tile!r}")
        return automatic()
    if tile is None:
        small = math.prod(spatial) <= WHOLE_IMAGE_PIXEL_LIMIT
        return None if small else automatic()
    return tuple(int(t) for t in tile)


def predict_image(
    model: EvaluatedModel,
    image: np.ndarray,
    *,
    tile: Sequence[int] | str | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    out: np.ndarray | None = None,
    net: nn.Module | None = None,
) -> Prediction:
    """Denoise and segment one raw ``(C, *spatial)`` image with a loaded model (or a run's current network).

    ``tile``: ``None`` runs small images (up to 1024x1024 pixels) whole and tiles larger
    ones with tiles sized to the device (:func:`device_tile`); ``"auto"`` always tiles so;
    a sequence gives the tile size. ``device=None`` runs where the model currently is (so
    a training loop can call this for validation); the network's train/eval mode is
    restored after. ``precision``: ``fp32``, ``bf16`` or ``auto`` (bf16 where the hardware
    has it natively). The image may be any numeric type (e.g. uint16): it is normalised
    tile by tile, so no full-size float copy is made. ``out``: an optional ``(C + K,
    *spatial)`` float32 array (e.g. :func:`tiff_memmap`) receiving denoised channels then
    probabilities; the returned arrays are views of it. ``net``: the model's inference network
    prepared once for many images (e.g. batch norms folded, see
    :class:`~denoiseg_core.evaluation.ImagePredictor`); default ``model.inference_net()``.
    """
    image = np.asarray(image)
    if image.dtype.kind not in "uifb":
        raise DataError(f"unsupported pixel type {image.dtype}")
    if image.ndim != model.ndim + 1 or image.shape[0] != model.in_channels:
        raise DataError(
            f"image of shape {image.shape} does not match the model "
            f"({model.in_channels} channel(s), {model.ndim}-D)"
        )
    if image.dtype.kind == "b":
        image = image.astype(np.float32)
    divisor, halo = model.built.size_divisor, model.built.halo
    target = resolve_device(device)
    where = target if target is not None else next(model.built.net.parameters()).device
    chosen_tile = choose_tile(tile, image.shape[1:], divisor, halo, device=where)

    was_training = model.built.net.training
    try:
        output = predict_array(
            net if net is not None else model.inference_net(),  # sets eval mode
            image,
            divisor=divisor,
            halo=halo,
            tile=chosen_tile,
            batch_size=batch_size,
            device=target,
            precision=precision,
            out_channels=model.in_channels + model.built.head.num_classes,
            normalization=model.normalization,
            out=out,
        )
    finally:
        model.built.net.train(was_training)
    denoised = output[: model.in_channels]
    mean, std = model.normalization.arrays(model.ndim)
    denoised *= std  # in place: ``out`` may be a memory-mapped file
    denoised += mean
    return Prediction(denoised=denoised, probabilities=output[model.in_channels :])
