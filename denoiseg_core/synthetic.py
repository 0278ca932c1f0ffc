"""A synthetic fluorescence-nuclei data set for the demo and the tests (no downloads needed).

Each image holds ellipsoidal "nuclei" of varied size, orientation and brightness on a dim,
slowly varying background. A minority of nuclei touch or overlap a neighbour (the later one
wins, and every label is kept as one connected region). Nuclei have a smooth inner texture
and get dimmer towards their own border, so the seam between touching nuclei is visible.
The clean image is blurred slightly (a microscope's point spread function), then Gaussian
noise (optionally on top of Poisson-like shot noise) is added. 2-D and 3-D.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.segmentation import find_boundaries, relabel_sequential

from denoiseg_core.io import write_tiff

#: default standard deviation of the added Gaussian noise (intensities are in a 0..255-like range)
DEFAULT_NOISE_SIGMA = 30.0
BACKGROUND_LEVEL = 20.0
NUCLEUS_INTENSITY = (90.0, 210.0)
RADIUS_RANGE = (6.0, 11.0)
#: fraction of the image area (volume) the nuclei cover when ``n_objects`` is not given
COVERAGE = 0.2
#: probability that a new nucleus is placed against an existing one
TOUCHING_PROBABILITY = 0.2


def _random_rotation(ndim: int, rng: np.random.Generator) -> np.ndarray:
    if ndim == 2:
        angle = rng.uniform(0, np.pi)
        return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    q, r = np.linalg.qr(rng.normal(size=(ndim, ndim)))
    return q * np.sign(np.diag(r))  # uniformly distributed orthogonal matrix


def _smooth_field(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise scaled to zero mean and unit standard deviation."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma, mode="reflect")
    return (field - field.mean()) / max(field.std(), 1e-12)


def _paint_ellipsoid(
    labels: np.ndarray, label: int, center: np.ndarray, radii: np.ndarray, rotation: np.ndarray
) -> None:
    """Set the pixels of an ellipsoid to ``label`` (within its bounding box only)."""
    reach = radii.max() + 1
    lo = np.maximum(np.floor(center - reach).astype(int), 0)
    hi = np.minimum(np.ceil(center + reach).astype(int) + 1, labels.shape)
    if np.any(hi <= lo):
        return
    grids = np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij")
    offsets = np.stack([g - c for g, c in zip(grids, center)], axis=-1)
    local = offsets @ rotation  # coordinates along the ellipsoid's own axes
    inside = ((local / radii) ** 2).sum(axis=-1) <= 1.0
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    labels[box][inside] = label


def _place_objects(shape: tuple[int, ...], n_objects: int, rng: np.random.Generator) -> np.ndarray:
    ndim = len(shape)
    labels = np.zeros(shape, dtype=np.int32)
    extent = np.array(shape, dtype=float)
    centers: list[np.ndarray] = []
    sizes: list[float] = []
    for label in range(1, n_objects + 1):
        size = rng.uniform(*RADIUS_RANGE)
        radii = size * rng.uniform(0.75, 1.25, size=ndim)
        center = None
        if centers and rng.random() < TOUCHING_PROBABILITY:
            # Against a random neighbour, slightly overlapping it.
            j = int(rng.integers(len(centers)))
            direction = rng.normal(size=ndim)
            direction /= np.linalg.norm(direction)
            candidate = centers[j] + direction * (sizes[j] + size) * rng.uniform(0.75, 0.95)
            others_clear = all(
                np.linalg.norm(candidate - c) > 1.1 * (s + size)
                for i, (c, s) in enumerate(zip(centers, sizes))
                if i != j
            )
            if others_clear and np.all(candidate >= 0) and np.all(candidate < extent):
                center = candidate
        if center is None:
            for _ in range(50):  # rejection sampling for a well-separated position
                candidate = rng.uniform(0, extent)
                if all(np.linalg.norm(candidate - c) > 1.15 * (s + size) for c, s in zip(centers, sizes)):
                    center = candidate
                    break
        if center is None:
            continue  # the image is full
        centers.append(center)
        sizes.append(size)
        _paint_ellipsoid(labels, label, center, radii, _random_rotation(ndim, rng))
    return labels


def _clean_up(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Keep each label's largest connected piece; drop slivers smaller than ``min_size``."""
    out = np.zeros_like(labels)
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        pieces, n = ndimage.label(labels[box] == label)
        if n == 0:
            continue
        sizes = np.bincount(pieces.ravel())[1:]
        if sizes.max() < min_size:
            continue
        out[box][pieces == (np.argmax(sizes) + 1)] = label
    return relabel_sequential(out)[0].astype(np.int32)


def make_nuclei_image(
    shape: tuple[int, ...],
    rng: np.random.Generator,
    n_objects: int | None = None,
    noise_sigma: float = DEFAULT_NOISE_SIGMA,
    poisson_gain: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic image: ``(clean, noisy, labels)`` of ``shape`` (2-D YX or 3-D ZYX).

    ``clean`` and ``noisy`` are float32 (background about 20, nuclei about 90-210), ``labels``
    int32 instance labels 1..n. ``n_objects`` defaults to about 20% coverage. With
    ``poisson_gain`` g, shot noise ``g * Poisson(clean / g)`` is applied before the Gaussian noise.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if ndim not in (2, 3):
        raise ValueError(f"shape must be 2-D or 3-D, got {shape}")
    mean_radius = float(np.mean(RADIUS_RANGE))
    object_size = math.pi * mean_radius**2 if ndim == 2 else 4 / 3 * math.pi * mean_radius**3
    if n_objects is None:
        n_objects = max(1, round(COVERAGE * math.prod(shape) / object_size))
    labels = _place_objects(shape, n_objects, rng)
    labels = _clean_up(labels, min_size=max(4, int(0.25 * object_size)))

    n = int(labels.max())
    brightness = np.concatenate([[0.0], rng.uniform(*NUCLEUS_INTENSITY, size=n)])
    foreground = labels > 0
    # Distance to the object's own border (touching neighbours count as border too).
    interior = foreground & ~find_boundaries(labels, mode="inner")
    depth = ndimage.distance_transform_edt(interior)
    edge_dimming = 1.0 - 0.4 * np.exp(-depth / 1.5)
    texture = 1.0 + 0.12 * _smooth_field(shape, 2.0, rng)
    background = BACKGROUND_LEVEL * (1.0 + 0.25 * _smooth_field(shape, max(shape) / 4, rng))
    clean = background + foreground * brightness[labels] * edge_dimming * texture
    clean = ndimage.gaussian_filter(clean, 1.0)  # point spread function

    noisy = clean
    if poisson_gain is not None:
        noisy = poisson_gain * rng.poisson(np.maximum(noisy, 0) / poisson_gain)
    if noise_sigma > 0:
        noisy = noisy + rng.normal(0.0, noise_sigma, size=shape)
    return clean.astype(np.float32), np.asarray(noisy, dtype=np.float32), labels


def _write_labels(path: Path, labels: np.ndarray, overwrite: bool) -> None:
    dtype = np.uint16 if labels.max() < 2**16 else np.int32
    write_tiff(path, labels.astype(dtype), overwrite=overwrite)


def write_synthetic_dataset(
    root: Path,
    n_train: int = 24,
    n_labelled: int = 6,
    n_val: int = 4,
    n_test: int = 6,
    shape: tuple[int, ...] = (128, 128),
    seed: int = 0,
    noise_sigma: float = DEFAULT_NOISE_SIGMA,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write a synthetic data set as TIFFs and return its folders.

    Layout: ``root/train/images`` (noisy), ``root/train/masks`` for the first ``n_labelled``
    training images only, ``root/val/{images,masks}``, ``root/test/{images,masks,clean}``.
    Returned keys: ``root``, ``train``, ``val``, ``test`` (folders :func:`load_folder` reads),
    and ``test_images``, ``test_masks``, ``test_clean``. Existing files are an error unless
    ``overwrite``.
    """
    if not 0 <= n_labelled <= n_train:
        raise ValueError(f"n_labelled must be between 0 and n_train={n_train}, got {n_labelled}")
    root = Path(root)
    folders = {"root": root, "train": root / "train", "val": root / "val", "test": root / "test"}
    folders.update(
        test_images=root / "test" / "images", test_masks=root / "test" / "masks", test_clean=root / "test" / "clean"
    )
    for split_index, (split, count) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        for i in range(count):
            # One stream per image: changing n_train does not change the val/test images.
            rng = np.random.default_rng([seed, split_index, i])
            clean, noisy, labels = make_nuclei_image(shape, rng, noise_sigma=noise_sigma)
            name = f"{split}_{i:03d}.tif"
            write_tiff(folders[split] / "images" / name, noisy, overwrite=overwrite)
            if split != "train" or i < n_labelled:
                _write_labels(folders[split] / "masks" / name, labels, overwrite)
            if split == "test":
                write_tiff(folders["test_clean"] / name, clean, overwrite=overwrite)
    return folders
