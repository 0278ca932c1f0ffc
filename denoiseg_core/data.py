"""Training data: loading folders and DenoiSeg ``.npz`` files, few-shot label selection,
normalisation statistics and random patch sampling with 8-fold augmentation.

Every image is held channel-first, ``(C, *spatial)`` float32, with its raw intensities;
normalisation happens only inside :class:`PatchSampler` (and :meth:`Normalization.normalize`). Anything
wrong with the user's files raises a one-line :class:`~denoiseg_core.errors.DataError`
naming the file.
"""

from __future__ import annotations

import dataclasses
import math
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from torch.utils import data as torch_data

from denoiseg_core.components import TargetSpec
from denoiseg_core.config import DataConfig
from denoiseg_core.errors import ConfigError, DataError
from denoiseg_core.io import TIFF_SUFFIXES, read_image

AXES_CHOICES = ("auto", "YX", "ZYX", "CYX", "CZYX")
NPZ_KEYS = ("X_train", "Y_train", "X_val", "Y_val")
#: smallest standard deviation used for normalisation (a constant image would divide by zero)
MIN_STD = 1e-6


@dataclass
class ImageRecord:
    """One image with its (optional) instance labels."""

    image: np.ndarray  # float32 (C, *spatial), raw intensities
    labels: np.ndarray | None  # int32 instance labels (spatial shape), None = unlabelled
    path: Path | None = None  # source file, for messages
    clean: np.ndarray | None = None  # noise-free image (C, *spatial), for PSNR

    @property
    def ndim(self) -> int:
        """Number of spatial dimensions (2 or 3)."""
        return self.image.ndim - 1

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape[1:])

    @property
    def channels(self) -> int:
        return int(self.image.shape[0])

    @property
    def name(self) -> str:
        """A short name for messages and tables."""
        return self.path.name if self.path is not None else "<array>"


# --------------------------------------------------------------------------- single arrays


def to_channel_first(array: np.ndarray, axes: str, path: Path | str | None) -> np.ndarray:
    """Return ``array`` as float32 ``(C, *spatial)``.

    ``axes`` is one of ``auto``, ``YX``, ``ZYX``, ``CYX``, ``CZYX``; ``auto`` reads a 2-D array
    as YX and a 3-D array as ZYX (one channel). Non-finite values are an error.
    """
    array = np.asarray(array)
    if axes not in AXES_CHOICES:
        raise DataError(f"unknown axes {axes!r} (choose one of {', '.join(AXES_CHOICES)})", path)
    if axes == "auto":
        if array.ndim == 2:
            axes = "YX"
        elif array.ndim == 3:
            if array.shape[-1] in (3, 4) and min(array.shape[:2]) > 8:
                # (Y, X, 3|4) is how tifffile returns RGB(A); reading it as ZYX would be nonsense.
                raise DataError(
                    f"shape {array.shape} looks like an RGB(A) image; convert it to grayscale "
                    "or to channel-first (CYX) and set data.axes",
                    path,
                )
            axes = "ZYX"
        else:
            raise DataError(
                f"cannot guess the axes of a {array.ndim}-D image of shape {array.shape} "
                "(auto handles YX and ZYX; set data.axes to CYX or CZYX)",
                path,
            )
    if array.ndim != len(axes):
        raise DataError(f"axes {axes} need a {len(axes)}-D image, got shape {array.shape}", path)
    if array.dtype.kind not in "uifb":
        raise DataError(f"unsupported pixel type {array.dtype}", path)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataError("image contains NaN or infinite values", path)
    image = array.astype(np.float32, copy=False)
    if not axes.startswith("C"):
        image = image[np.newaxis]
    if not np.isfinite(image).all():  # finite in the file, e.g. 1e300 as float64, but not in float32
        raise DataError("image has values beyond the float32 range the network computes in", path)
    return np.ascontiguousarray(image)


def validate_mask(mask: np.ndarray, image_spatial_shape: Sequence[int], path: Path | str | None) -> np.ndarray:
    """Check an instance label image and return it as int32.

    Accepts integer masks, float masks holding whole numbers, and boolean masks (whose
    connected components become the instances). Singleton axes are dropped when that makes
    the shape match the image (e.g. a ``(1, Y, X)`` mask for a ``(Y, X)`` image).
    """
    mask = np.asarray(mask)
    expected = tuple(int(s) for s in image_spatial_shape)
    if mask.shape != expected and np.squeeze(mask).shape == tuple(s for s in expected if s != 1):
        mask = mask.reshape(expected)
    if mask.shape != expected:
        raise DataError(f"mask shape {mask.shape} does not match image shape {expected}", path)
    if mask.dtype.kind == "b":
        labels, _ = ndimage.label(mask)
        return labels.astype(np.int32)
    if mask.dtype.kind == "f":
        if not np.isfinite(mask).all():
            raise DataError("mask contains NaN or infinite values", path)
        if not np.array_equal(mask, np.round(mask)):
            raise DataError("mask has non-integer values; expected instance labels (0 = background)", path)
    elif mask.dtype.kind not in "ui":
        raise DataError(f"unsupported mask pixel type {mask.dtype}", path)
    if mask.size and mask.min() < 0:
        raise DataError("mask has negative values; expected instance labels (0 = background)", path)
    if mask.size and mask.max() > np.iinfo(np.int32).max:
        raise DataError("mask has label values beyond the int32 range", path)
    return mask.astype(np.int32)


# --------------------------------------------------------------------------- folders


def _tiff_files(folder: Path) -> list[Path]:
    """TIFF files in ``folder`` by name; other files (README, .DS_Store, hidden files) are ignored."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.suffix.lower() in TIFF_SUFFIXES and not p.name.startswith(".") and not p.is_dir()
    )


def _check_consistent(records: Sequence[ImageRecord]) -> None:
    """All images must share spatial dimensionality and channel count."""
    if not records:
        return
    first = records[0]
    for record in records[1:]:
        if record.ndim != first.ndim:
            raise DataError(
                f"image is {record.ndim}-D but {first.name} is {first.ndim}-D; all images must have "
                "the same dimensionality",
                record.path,
            )
        if record.channels != first.channels:
            raise DataError(
                f"image has {record.channels} channel(s) but {first.name} has {first.channels}; "
                "all images must have the same channels",
                record.path,
            )


def load_folder(
    folder: Path, axes: str = "auto", require_masks: bool = False, pixel_limit: int | None = None
) -> list[ImageRecord]:
    """Load ``folder/images/*.tif(f)`` with instance labels from ``folder/masks/<same name>``.

    Masks are optional (images without one are unlabelled) unless ``require_masks``. A folder
    without an ``images/`` subfolder is read directly (its TIFFs are the images, no masks).
    Masks match images by file name without suffix, so ``a.tif`` may pair with ``a.tiff``.
    """
    folder = Path(folder)
    if not folder.exists():
        raise DataError("folder not found", folder)
    if not folder.is_dir():
        raise DataError("not a folder (expected a folder with images/ and masks/, or a .npz file)", folder)
    images_dir = folder / "images"
    masks_dir: Path | None = folder / "masks"
    if not images_dir.is_dir():
        if not _tiff_files(folder):
            raise DataError("no images/ subfolder and no .tif/.tiff images in the folder", folder)
        images_dir, masks_dir = folder, None
    image_files = _tiff_files(images_dir)
    if not image_files:
        raise DataError("no .tif/.tiff images in folder", images_dir)

    mask_files: dict[str, Path] = {}
    if masks_dir is not None and masks_dir.is_dir():
        for mask_path in _tiff_files(masks_dir):
            if mask_path.stem in mask_files:
                raise DataError(f"two masks for the same image ({mask_files[mask_path.stem].name})", mask_path)
            mask_files[mask_path.stem] = mask_path
    image_stems = {p.stem for p in image_files}
    for stem, mask_path in mask_files.items():
        if stem not in image_stems:
            raise DataError(f"mask has no matching image in {images_dir}", mask_path)
    if require_masks:
        missing = [p for p in image_files if p.stem not in mask_files]
        if missing:
            where = masks_dir if masks_dir is not None else folder / "masks"
            raise DataError(f"image has no mask in {where} (masks are required here)", missing[0])

    records: list[ImageRecord] = []
    for image_path in image_files:
        image = to_channel_first(read_image(image_path), axes, image_path)
        if pixel_limit is not None and math.prod(image.shape[1:]) > pixel_limit:
            raise DataError(
                f"image has {math.prod(image.shape[1:])} pixels, more than data.pixel_limit={pixel_limit}", image_path
            )
        labels = None
        mask_path = mask_files.get(image_path.stem)
        if mask_path is not None:
            labels = validate_mask(read_image(mask_path), image.shape[1:], mask_path)
        record = ImageRecord(image=image, labels=labels, path=image_path)
        _check_consistent([records[0], record] if records else [record])
        records.append(record)
    return records


# --------------------------------------------------------------------------- npz


def _npz_images(x: np.ndarray, key: str, path: Path) -> list[np.ndarray]:
    """``X`` of shape (N,Y,X), (N,Y,X,1), (N,Z,Y,X) or (N,Z,Y,X,1) -> list of (1, *spatial)."""
    if x.ndim == 5 or (x.ndim == 4 and x.shape[-1] == 1):
        if x.shape[-1] != 1:
            raise DataError(f"{key} has shape {x.shape}; only a single trailing channel is supported", path)
        x = x[..., 0]
    if x.ndim not in (3, 4):
        raise DataError(f"{key} has shape {x.shape}; expected (N,Y,X), (N,Y,X,1) or (N,Z,Y,X)", path)
    if x.dtype.kind not in "uif":
        raise DataError(f"{key} has unsupported type {x.dtype}", path)
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0])
        raise DataError(f"{key}[{bad}] contains NaN or infinite values", path)
    return [np.ascontiguousarray(img[np.newaxis]) for img in x]


def _npz_labels(y: np.ndarray, key: str, n: int, spatial: tuple[int, ...], path: Path) -> list[np.ndarray]:
    if len(y) != n:
        raise DataError(f"{key} has {len(y)} entries but its images have {n}", path)
    out = []
    for i in range(n):
        try:
            out.append(validate_mask(y[i], spatial, None))
        except DataError as exc:
            raise DataError(f"{key}[{i}]: {exc}", path) from None
    return out


def load_npz(path: Path) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Load a DenoiSeg ``.npz`` (``X_train``, ``Y_train``, ``X_val``, ``Y_val``).

    As in the original DenoiSeg data, an all-zero ``Y_train`` entry marks an unlabelled patch
    (its record gets ``labels=None``); validation labels are kept as they are.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            if missing:
                raise DataError(
                    f"missing array(s) {', '.join(missing)} (has: {', '.join(npz.files) or 'none'}); "
                    f"a DenoiSeg .npz needs {', '.join(NPZ_KEYS)}",
                    path,
                )
            arrays = {k: np.asarray(npz[k]) for k in NPZ_KEYS}
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"not a readable .npz file ({reason})", path) from None

    result = []
    for x_key, y_key, is_train in (("X_train", "Y_train", True), ("X_val", "Y_val", False)):
        images = _npz_images(arrays[x_key], x_key, path)
        spatial = images[0].shape[1:] if images else ()
        labels = _npz_labels(arrays[y_key], y_key, len(images), spatial, path)
        records = [
            ImageRecord(image=img, labels=None if (is_train and not lab.any()) else lab, path=None)
            for img, lab in zip(images, labels)
        ]
        result.append(records)
    if not result[0]:
        raise DataError("X_train is empty", path)
    return result[0], result[1]


# --------------------------------------------------------------------------- training data


def _rng(seed: int, purpose: int) -> np.random.Generator:
    """Independent, reproducible random streams for each step of data preparation."""
    return np.random.default_rng([seed, purpose])


def add_gaussian_noise(records: Sequence[ImageRecord], sigma: float, rng: np.random.Generator) -> list[ImageRecord]:
    """New records with ``N(0, sigma^2)`` noise added; the original image goes into ``clean``."""
    out = []
    for record in records:
        noise = rng.normal(0.0, sigma, size=record.image.shape).astype(np.float32)
        out.append(dataclasses.replace(record, image=record.image + noise, clean=record.image))
    return out


def load_training_data(data_config: DataConfig, seed: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Training and validation records as the config asks.

    1. Training images come from a folder or a ``.npz`` (chosen by suffix).
    2. Validation: ``data.validation`` (a folder; every image needs a mask) if set; else the
       ``.npz``'s own ``X_val``/``Y_val``; else a seeded ``validation_fraction`` (at least one)
       of the labelled training images, which are then removed from training.
    3. ``n_labelled``: labels are kept for only that many (seeded choice) training images.
    4. ``noise_sigma`` > 0: Gaussian noise is added to training and validation images, the
       noise-free image is kept in ``clean``.
    """
    if data_config.train is None:
        raise ConfigError("data.train is not set (a folder with images/ and masks/, or a DenoiSeg .npz file)")
    train_source = Path(data_config.train)
    val_records: list[ImageRecord] = []
    if train_source.suffix.lower() == ".npz":
        train_records, val_records = load_npz(train_source)
        if data_config.pixel_limit is not None and math.prod(train_records[0].spatial_shape) > data_config.pixel_limit:
            raise DataError(f"images are larger than data.pixel_limit={data_config.pixel_limit} pixels", train_source)
    else:
        train_records = load_folder(train_source, data_config.axes, pixel_limit=data_config.pixel_limit)

    if data_config.validation is not None:
        val_records = load_folder(
            data_config.validation, data_config.axes, require_masks=True, pixel_limit=data_config.pixel_limit
        )
    elif not val_records:
        labelled = [i for i, r in enumerate(train_records) if r.labels is not None]
        if not labelled:
            raise DataError(
                "no labelled training images to hold out for validation (add masks/ or set data.validation)",
                train_source,
            )
        n_val = max(1, round(data_config.validation_fraction * len(labelled)))
        if n_val >= len(labelled) and data_config.n_labelled != 0:
            raise DataError(
                f"only {len(labelled)} labelled image(s): holding out {n_val} for validation leaves none "
                "for training (add more masks or set data.validation)",
                train_source,
            )
        held_out = set(_rng(seed, 1).choice(labelled, size=n_val, replace=False).tolist())
        val_records = [r for i, r in enumerate(train_records) if i in held_out]
        train_records = [r for i, r in enumerate(train_records) if i not in held_out]
    _check_consistent(train_records + val_records)

    if data_config.n_labelled is not None:
        labelled = [i for i, r in enumerate(train_records) if r.labels is not None]
        if data_config.n_labelled > len(labelled):
            raise ConfigError(
                f"data.n_labelled={data_config.n_labelled} but only {len(labelled)} labelled training image(s) "
                "are available (after holding out validation images)"
            )
        keep = set(_rng(seed, 2).choice(labelled, size=data_config.n_labelled, replace=False).tolist())
        train_records = [
            r if (r.labels is None or i in keep) else dataclasses.replace(r, labels=None)
            for i, r in enumerate(train_records)
        ]

    if data_config.noise_sigma > 0:
        noise_rng = _rng(seed, 3)
        train_records = add_gaussian_noise(train_records, data_config.noise_sigma, noise_rng)
        val_records = add_gaussian_noise(val_records, data_config.noise_sigma, noise_rng)
    return train_records, val_records


# --------------------------------------------------------------------------- normalisation


@dataclass
class Normalization:
    """Per-channel dataset statistics; the network sees ``(x - mean) / std``."""

    mean: list[float]
    std: list[float]

    def to_dict(self) -> dict:
        return {"mean": list(map(float, self.mean)), "std": list(map(float, self.std))}

    def arrays(self, spatial_ndim: int) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, std)`` as float32 ``(C, 1, ..., 1)`` arrays (``spatial_ndim`` ones) that broadcast
        against a channel-first image ``(C, *spatial)`` or a batch ``(N, C, *spatial)``."""
        shape = (-1,) + (1,) * spatial_ndim
        return (
            np.asarray(self.mean, dtype=np.float32).reshape(shape),
            np.asarray(self.std, dtype=np.float32).reshape(shape),
        )

    def normalize(self, image: np.ndarray, spatial_ndim: int | None = None) -> np.ndarray:
        """``(image - mean) / std`` per channel, float32; ``image`` is channel-first ``(C, *spatial)``,
        or has leading axes before the channel when ``spatial_ndim`` is given."""
        mean, std = self.arrays(image.ndim - 1 if spatial_ndim is None else spatial_ndim)
        return ((image - mean) / std).astype(np.float32)

    def denormalize(self, image: np.ndarray, spatial_ndim: int | None = None) -> np.ndarray:
        """Inverse of :meth:`normalize`."""
        mean, std = self.arrays(image.ndim - 1 if spatial_ndim is None else spatial_ndim)
        return (image * std + mean).astype(np.float32)


def compute_normalization(records: Sequence[ImageRecord]) -> Normalization:
    """Per-channel mean and standard deviation over all pixels of all images (std >= 1e-6)."""
    if not records:
        raise DataError("no training images to compute normalisation statistics from")
    channels = records[0].channels
    count = sum(math.prod(r.spatial_shape) for r in records)
    # Two passes in float64: sum of squared deviations is accurate even with a large offset.
    total = np.zeros(channels)
    for r in records:
        total += r.image.reshape(channels, -1).sum(axis=1, dtype=np.float64)
    mean = total / count
    squared = np.zeros(channels)
    for r in records:
        squared += ((r.image.reshape(channels, -1).astype(np.float64) - mean[:, None]) ** 2).sum(axis=1)
    std = np.maximum(np.sqrt(squared / count), MIN_STD)
    return Normalization(mean=mean.tolist(), std=std.tolist())


# --------------------------------------------------------------------------- patches


def _pad_to(array: np.ndarray, minimum: Sequence[int]) -> np.ndarray:
    """Reflect-pad the trailing ``len(minimum)`` axes at their end up to ``minimum``."""
    lead = array.ndim - len(minimum)
    pads = [(0, 0)] * lead + [(0, max(0, m - s)) for s, m in zip(array.shape[lead:], minimum)]
    if all(after == 0 for _, after in pads):
        return array
    # 'reflect' needs at least two pixels along an axis; 'symmetric' repeats a single one.
    mode = "reflect" if min(array.shape[lead:]) > 1 else "symmetric"
    return np.pad(array, pads, mode=mode)


class PatchSampler:
    """Random training patches from a set of records.

    Images are normalised once up front, and each labelled record's target
    (``targets_fn(labels)``, e.g. the head's 3-class map, of the dtype and shape ``target``
    declares) is computed once. Images smaller than the patch along some axis are
    reflect-padded at the end of that axis (the target the same way).

    With ``labelled_fraction=None`` every possible patch position in the data set is equally
    likely (the paper's uniform sampling); with a number ``f``, ``round(f * batch_size)``
    patches come from labelled images and the rest from all images.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        patch_size: Sequence[int],
        normalization: Normalization,
        targets_fn: Callable[[np.ndarray], np.ndarray],
        target: TargetSpec,
        labelled_fraction: float | None = None,
        augment: bool = True,
        seed: int = 0,
    ):
        if not records:
            raise DataError("no training images")
        _check_consistent(records)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.ndim = records[0].ndim
        self.channels = records[0].channels
        if len(self.patch_size) != self.ndim:
            raise DataError(
                f"patch_size has {len(self.patch_size)} entries but the images are {self.ndim}-D "
                f"(set data.patch_size to {self.ndim} values)"
            )
        if labelled_fraction is not None and not 0 <= labelled_fraction <= 1:
            raise ValueError(f"labelled_fraction must be in [0, 1], got {labelled_fraction}")
        self.labelled_fraction = labelled_fraction
        self.augment = augment
        self.seed = seed
        self.target = target
        self.images: list[np.ndarray] = []
        self.targets: list[np.ndarray | None] = []
        for record in records:
            self.images.append(_pad_to(normalization.normalize(record.image), self.patch_size))
            target = None
            if record.labels is not None:
                target = np.asarray(targets_fn(record.labels))
                expected = self.target.shape(record.spatial_shape)
                if target.shape != expected or target.dtype != np.dtype(self.target.dtype):
                    raise ValueError(
                        f"targets_fn returned {target.dtype} of shape {target.shape} for labels of shape "
                        f"{record.spatial_shape}; the head declares {self.target.dtype} of shape {expected}"
                    )
                target = _pad_to(target, self.patch_size)
            self.targets.append(target)
        # number of possible patch positions in each (padded) image
        positions = np.array(
            [math.prod(s - p + 1 for s, p in zip(img.shape[1:], self.patch_size)) for img in self.images],
            dtype=np.float64,
        )
        self._p_all = positions / positions.sum()
        self._labelled = np.array([t is not None for t in self.targets])
        lab_positions = positions * self._labelled
        self._p_labelled = lab_positions / lab_positions.sum() if lab_positions.sum() > 0 else None
        # rot90 in YX keeps the patch shape only for square YX patches; otherwise only 180 degrees.
        self._rotations = (0, 1, 2, 3) if self.patch_size[-1] == self.patch_size[-2] else (0, 2)

    @property
    def labelled_count(self) -> int:
        """Number of images with labels."""
        return int(self._labelled.sum())

    def __len__(self) -> int:
        return len(self.images)

    def _choose_images(self, batch_size: int, rng: np.random.Generator, labelled_fraction: float | None) -> np.ndarray:
        n = len(self.images)
        if labelled_fraction is None or self._p_labelled is None:
            return rng.choice(n, size=batch_size, p=self._p_all)
        n_lab = int(math.floor(labelled_fraction * batch_size + 0.5))
        return np.concatenate(
            [rng.choice(n, size=n_lab, p=self._p_labelled), rng.choice(n, size=batch_size - n_lab, p=self._p_all)]
        )

    def sample(
        self, batch_size: int, rng: np.random.Generator, labelled_fraction: float | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A batch: patches float32 ``(B, C, *P)`` (normalised), targets ``(B, *target shape)`` of
        the target's dtype (zeros where unlabelled) and a bool ``(B,)`` that is True for labelled patches.
        ``labelled_fraction`` replaces the sampler's own for this batch (a schedule over the steps)
        when the sampler draws labelled patches separately at all."""
        fraction = self.labelled_fraction
        if fraction is not None and labelled_fraction is not None:
            fraction = labelled_fraction
        chosen = self._choose_images(batch_size, rng, fraction)
        patches = np.empty((batch_size, self.channels, *self.patch_size), dtype=np.float32)
        targets = np.zeros((batch_size, *self.target.shape(self.patch_size)), dtype=self.target.dtype)
        labelled = self._labelled[chosen].copy()
        yx = (-2, -1)
        for b, index in enumerate(chosen):
            image, target = self.images[index], self.targets[index]
            corner = [int(rng.integers(0, s - p + 1)) for s, p in zip(image.shape[1:], self.patch_size)]
            window = tuple(slice(c, c + p) for c, p in zip(corner, self.patch_size))
            patch = image[(slice(None), *window)]
            patch_target = target[(..., *window)] if target is not None else None
            if self.augment:
                k = int(rng.choice(self._rotations))
                flip = bool(rng.integers(2))
                patch = np.rot90(patch, k, axes=yx)
                if flip:
                    patch = np.flip(patch, axis=-1)
                if patch_target is not None:
                    patch_target = np.rot90(patch_target, k, axes=yx)
                    if flip:
                        patch_target = np.flip(patch_target, axis=-1)
            patches[b] = patch
            if patch_target is not None:
                targets[b] = patch_target
        return patches, targets, labelled


class PatchStream(torch_data.IterableDataset):
    """An endless stream of :meth:`PatchSampler.sample` batches for a torch ``DataLoader``.

    Use ``DataLoader(stream, batch_size=None, num_workers=n)``: each worker process draws
    whole batches from its own generator, seeded by ``seed`` plus the worker's id, so a
    seeded run gives the same batches in the same order (the loader takes them from the
    workers in turn). In the main process (``num_workers=0``) the stream uses ``seed`` alone.

    ``fraction_at(i)`` gives the labelled fraction of the run's ``i``-th batch (a schedule; ``None``:
    the sampler's own); the stream starts at batch ``first_batch``.
    """

    def __init__(
        self,
        sampler: PatchSampler,
        batch_size: int,
        seed: int | Sequence[int] = 0,
        fraction_at: Callable[[int], float | None] | None = None,
        first_batch: int = 0,
    ):
        super().__init__()
        self.sampler = sampler
        self.batch_size = int(batch_size)
        self.seed = [int(seed)] if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
        self.fraction_at = fraction_at
        self.first_batch = int(first_batch)

    def __iter__(self):
        info = torch_data.get_worker_info()
        rng = np.random.default_rng(self.seed if info is None else [*self.seed, info.id])
        # the loader takes batches from its workers in turn
        index, stride = (self.first_batch, 1) if info is None else (self.first_batch + info.id, info.num_workers)
        while True:
            fraction = self.fraction_at(index) if self.fraction_at is not None else None
            yield self.sampler.sample(self.batch_size, rng, fraction)
            index += stride
