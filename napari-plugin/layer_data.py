"""Between napari layers and denoiseg's files: axes, images per layer, the training folder.

No Qt here: everything is plain numpy and denoiseg_core, so it is testable on its own.
A layer is cut into the images the trainer sees along its ``S`` axis (a stack of 2-D
images ``SYX`` or of volumes ``SZYX``); ``YX`` and ``ZYX`` layers are one image each.
An image or slice of the annotation layer with no painted pixel is unlabelled: it is used
for denoising only, never as "all background" (a partly painted volume is labelled only
in its painted z slices).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from denoiseg_core.errors import DataError
from denoiseg_core.io import write_tiff

#: the axes a layer may have: optional stack axis S, then YX (2-D) or ZYX (3-D)
AXES_CHOICES = ("YX", "SYX", "ZYX", "SZYX")


def default_axes(ndim: int) -> str:
    """The usual meaning of a layer with ``ndim`` dimensions (3-D data is ambiguous: a stack
    of 2-D images is the common case in DenoiSeg's few-shot setting)."""
    return {2: "YX", 3: "SYX", 4: "SZYX"}.get(ndim, "YX")


def check_axes(name: str, shape: Sequence[int], axes: str) -> None:
    if axes not in AXES_CHOICES:
        raise DataError(f"layer {name!r}: unknown axes {axes!r} (choose one of {', '.join(AXES_CHOICES)})")
    if len(shape) != len(axes):
        raise DataError(f"layer {name!r} has {len(shape)} dimensions {tuple(shape)} but axes {axes!r} has {len(axes)}")


def split_images(name: str, data: np.ndarray, axes: str) -> list[np.ndarray]:
    """The images of a layer: its slices along ``S``, or the layer itself."""
    check_axes(name, data.shape, axes)
    data = np.asarray(data)
    if axes.startswith("S"):
        return [data[i] for i in range(data.shape[0])]
    return [data]


def stack_like(images: Sequence[np.ndarray], axes: str) -> np.ndarray:
    """The inverse of :func:`split_images`: one array with the layer's axes."""
    return np.stack(images) if axes.startswith("S") else images[0]


@dataclass
class ImageLayer:
    """What the trainer needs from one raw image layer."""

    name: str
    data: np.ndarray
    axes: str


@dataclass
class TrainingFolders:
    """Where :func:`write_training_data` put the data, and what it holds."""

    train: Path
    validation: Path | None  # set when a single image is labelled (it validates too)
    n_images: int
    n_labelled: int


def _file_stem(name: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name).strip("_")
    return safe or "layer"


def _painted_runs(painted: np.ndarray) -> list[tuple[int, int]]:
    """``[start, stop)`` of each run of consecutive True values."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], painted.astype(np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def _volume_entries(name: str, image: np.ndarray, mask: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """A painted volume: whole if every z slice is painted; otherwise the whole volume is
    unlabelled and each run of consecutive painted slices becomes its own labelled
    sub-volume, so unpainted slices are never taught as background."""
    painted = mask.reshape(mask.shape[0], -1).any(axis=1)
    if painted.all():
        return [(name, image, mask)]
    entries: list[tuple[str, np.ndarray, np.ndarray | None]] = [(name, image, None)]
    for start, stop in _painted_runs(painted):
        entries.append((f"{name}_z{start:04d}-{stop - 1:04d}", image[start:stop], mask[start:stop]))
    return entries


def write_training_data(
    folder: Path,
    layers: Sequence[ImageLayer],
    annotations: np.ndarray | None,
    annotated_layer: int | None = None,
) -> TrainingFolders:
    """Write the layers as a training folder (``images/`` + ``masks/``, see README "Your data").

    ``annotations``: the Labels layer's data, with the shape of ``layers[annotated_layer]``
    (default: the first layer of that shape). Each image (slice of an ``S`` stack) with any
    painted pixel becomes a labelled image; in a volume, only its painted z slices are
    labelled (see :func:`_volume_entries`). The folder is rewritten from scratch (it belongs
    to the widget's run), so an image whose paint was erased is unlabelled again.
    """
    if not layers:
        raise DataError("choose at least one image layer to train on")
    masks_of: dict[int, list[np.ndarray]] = {}
    if annotations is not None:
        annotations = np.asarray(annotations)
        if annotated_layer is None:
            matching = [i for i, layer in enumerate(layers) if tuple(layer.data.shape) == annotations.shape]
            if not matching:
                shapes = ", ".join(f"{layer.name!r} {tuple(layer.data.shape)}" for layer in layers)
                raise DataError(f"the annotation layer's shape {annotations.shape} matches no chosen image layer ({shapes})")
            annotated_layer = matching[0]
        layer = layers[annotated_layer]
        if tuple(layer.data.shape) != annotations.shape:
            raise DataError(f"the annotation layer's shape {annotations.shape} differs from layer {layer.name!r} {tuple(layer.data.shape)}")
        if annotations.dtype.kind not in "iub":
            raise DataError(f"the annotation layer holds {annotations.dtype} values; instance labels must be integers")
        masks_of[annotated_layer] = split_images(layer.name, annotations, layer.axes)
    # (file stem, image, mask or None) of every training image
    entries: list[tuple[str, np.ndarray, np.ndarray | None]] = []
    for layer_index, layer in enumerate(layers):
        stem = _file_stem(layer.name)
        masks = masks_of.get(layer_index)
        for index, image in enumerate(split_images(layer.name, layer.data, layer.axes)):
            name, mask = f"{stem}_{index:04d}", masks[index] if masks is not None else None
            if mask is None or not mask.any():
                entries.append((name, image, None))
            elif spatial_ndim(layer.axes) == 3:
                entries.extend(_volume_entries(name, image, mask))
            else:
                entries.append((name, image, mask))
    n_labelled = sum(mask is not None for _, _, mask in entries)
    if n_labelled == 0:
        raise DataError(
            "no painted nuclei: paint every nucleus of at least one image (or slice) in the annotation layer"
        )
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    train, validation = folder / "train", folder / "validation"
    for name, image, mask in entries:
        file_name = f"{name}.tif"
        write_tiff(train / "images" / file_name, np.ascontiguousarray(image))
        if mask is None:
            continue
        labels = mask.astype(np.uint16 if mask.max() < 2**16 else np.int32)
        write_tiff(train / "masks" / file_name, labels)
        if n_labelled == 1:
            # The held-out split needs two labelled images; with one, it validates too
            # (the threshold and best epoch are then tuned on the training image).
            write_tiff(validation / "images" / file_name, np.ascontiguousarray(image))
            write_tiff(validation / "masks" / file_name, labels)
    return TrainingFolders(train, validation if n_labelled == 1 else None, len(entries), n_labelled)


def parse_patch_size(text: str, spatial_ndim: int) -> list[int]:
    """``"64"`` -> ``[64, 64]`` (or ``[64, 64, 64]``); ``"16,64,64"`` as given."""
    try:
        sizes = [int(part) for part in text.replace("x", ",").split(",") if part.strip()]
    except ValueError:
        raise DataError(f"patch size {text!r}: expected a number like 64 or one per axis like 16,64,64") from None
    if len(sizes) == 1:
        sizes = sizes * spatial_ndim
    if len(sizes) != spatial_ndim:
        raise DataError(f"patch size {text!r} has {len(sizes)} entries but the images are {spatial_ndim}-D")
    return sizes


def spatial_ndim(axes: str) -> int:
    return len(axes.lstrip("S"))
