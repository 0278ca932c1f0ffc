"""Data loading, few-shot label selection, noise, normalisation and patch sampling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from denoiseg_core.components import TargetSpec
from denoiseg_core.config import DataConfig
from denoiseg_core.data import (
    ImageRecord,
    PatchSampler,
    Normalization,
    compute_normalization,
    load_folder,
    load_npz,
    load_training_data,
    to_channel_first,
)
from denoiseg_core.errors import DataError


def foreground(labels: np.ndarray) -> np.ndarray:
    """Stand-in for a head's targets(): 1 inside objects."""
    return (labels > 0).astype(np.int64)


INT_TARGET = TargetSpec("int64")


def _write_dataset(root: Path, n: int, n_masks: int, shape=(24, 28), value=None) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image = np.full(shape, float(i if value is None else value), dtype=np.float32)
        tifffile.imwrite(root / "images" / f"img{i:02d}.tif", image)
        if i < n_masks:
            labels = np.zeros(shape, dtype=np.uint16)
            labels[2:8, 3:9] = i + 1
            tifffile.imwrite(root / "masks" / f"img{i:02d}.tif", labels)
    return root


# --------------------------------------------------------------------------- loading


def test_to_channel_first_axes():
    assert to_channel_first(np.zeros((5, 6), np.uint8), "auto", None).shape == (1, 5, 6)
    assert to_channel_first(np.zeros((4, 5, 6)), "auto", None).shape == (1, 4, 5, 6)
    assert to_channel_first(np.zeros((2, 5, 6)), "CYX", None).shape == (2, 5, 6)
    out = to_channel_first(np.zeros((2, 3, 5, 6), np.uint16), "CZYX", None)
    assert out.shape == (2, 3, 5, 6) and out.dtype == np.float32


def test_load_folder_pairs_masks_by_name(tmp_path):
    root = _write_dataset(tmp_path / "ds", n=4, n_masks=2)
    # a mask saved with the other TIFF suffix still pairs with its image
    (root / "masks" / "img01.tif").rename(root / "masks" / "img01.tiff")
    records = load_folder(root)
    assert [r.path.name for r in records] == ["img00.tif", "img01.tif", "img02.tif", "img03.tif"]
    assert [r.labels is not None for r in records] == [True, True, False, False]
    assert records[1].labels.max() == 2 and records[1].labels.dtype == np.int32
    assert records[0].image.shape == (1, 24, 28) and records[0].image.dtype == np.float32
    assert records[0].ndim == 2 and records[0].spatial_shape == (24, 28)


def test_load_folder_without_images_subfolder(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(2):
        tifffile.imwrite(flat / f"a{i}.tiff", np.ones((8, 9), np.uint16) * i)
    records = load_folder(flat)
    assert len(records) == 2 and all(r.labels is None for r in records)
    assert records[1].image.max() == 1


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.normal(size=(5, 16, 16)).astype(np.float32)
    y_train = np.zeros((5, 16, 16), dtype=np.int32)
    y_train[1, 2:5, 2:5] = 3
    y_train[3, 8:12, 8:12] = 1
    x_val = rng.normal(size=(2, 16, 16, 1)).astype(np.float32)  # the trailing-channel layout
    y_val = np.zeros((2, 16, 16), dtype=np.int32)
    y_val[0, 1:4, 1:4] = 7
    path = tmp_path / "data.npz"
    np.savez(path, X_train=x_train, Y_train=y_train, X_val=x_val, Y_val=y_val)
    train, val = load_npz(path)
    assert len(train) == 5 and len(val) == 2
    np.testing.assert_array_equal(np.stack([r.image[0] for r in train]), x_train)
    assert [r.labels is not None for r in train] == [False, True, False, True, False]
    np.testing.assert_array_equal(train[1].labels, y_train[1])
    # validation keeps all labels, even the all-zero one
    assert all(r.labels is not None for r in val)
    np.testing.assert_array_equal(val[0].image[0], x_val[0, ..., 0])
    np.testing.assert_array_equal(val[0].labels, y_val[0])


def test_npz_3d(tmp_path):
    path = tmp_path / "vol.npz"
    y = np.zeros((2, 4, 8, 8), np.uint16)
    y[0, 1:3, 2:5, 2:5] = 1
    np.savez(path, X_train=np.ones((2, 4, 8, 8)), Y_train=y, X_val=np.ones((1, 4, 8, 8)), Y_val=y[:1])
    train, val = load_npz(path)
    assert train[0].image.shape == (1, 4, 8, 8) and train[0].ndim == 3
    assert train[1].labels is None and val[0].labels.shape == (4, 8, 8)


def test_npz_training_data_uses_its_validation(tmp_path):
    path = tmp_path / "data.npz"
    y = np.zeros((4, 16, 16), np.int32)
    y[:, 3:6, 3:6] = 1
    np.savez(path, X_train=np.zeros((4, 16, 16)), Y_train=y, X_val=np.ones((3, 16, 16)), Y_val=y[:3])
    train, val = load_training_data(DataConfig(train=path, n_labelled=2), seed=0)
    assert len(train) == 4 and len(val) == 3
    assert sum(r.labels is not None for r in train) == 2


# --------------------------------------------------------------------------- few-shot and noise


def test_validation_held_out_from_labelled(tmp_path):
    root = _write_dataset(tmp_path / "ds", n=12, n_masks=10)
    config = DataConfig(train=root, validation_fraction=0.2)
    train, val = load_training_data(config, seed=3)
    assert len(val) == 2 and all(r.labels is not None for r in val)
    assert len(train) == 10
    # held-out images are gone from training
    assert not {r.path.name for r in val} & {r.path.name for r in train}
    assert sum(r.labels is not None for r in train) == 8


def test_validation_folder(tmp_path):
    root = _write_dataset(tmp_path / "ds", n=5, n_masks=1)
    val_root = _write_dataset(tmp_path / "val", n=2, n_masks=2)
    train, val = load_training_data(DataConfig(train=root, validation=val_root), seed=0)
    assert len(train) == 5 and len(val) == 2
    assert sum(r.labels is not None for r in train) == 1


def test_n_labelled_is_exact_and_seeded(tmp_path):
    root = _write_dataset(tmp_path / "ds", n=20, n_masks=15)
    val_root = _write_dataset(tmp_path / "val", n=1, n_masks=1)
    config = DataConfig(train=root, validation=val_root, n_labelled=4)

    def chosen(seed: int) -> list[str]:
        train, _ = load_training_data(config, seed=seed)
        assert len(train) == 20
        return sorted(r.path.name for r in train if r.labels is not None)

    first = chosen(0)
    assert len(first) == 4
    assert first == chosen(0)
    assert any(chosen(s) != first for s in (1, 2, 3))
    # only images that had masks can be chosen
    assert all(int(name[3:5]) < 15 for name in first)


def test_n_labelled_zero(tmp_path):
    root = _write_dataset(tmp_path / "ds", n=6, n_masks=3)
    train, val = load_training_data(DataConfig(train=root, n_labelled=0), seed=0)
    assert sum(r.labels is not None for r in train) == 0 and len(val) == 1


def test_noise_has_requested_sigma(tmp_path):
    root = _write_dataset(tmp_path / "ds", n=4, n_masks=3, shape=(64, 64), value=50.0)
    val_root = _write_dataset(tmp_path / "val", n=2, n_masks=2, shape=(64, 64), value=50.0)
    config = DataConfig(train=root, validation=val_root, noise_sigma=7.0)
    train, val = load_training_data(config, seed=1)
    for records in (train, val):
        residual = np.concatenate([(r.image - r.clean).ravel() for r in records])
        assert residual.std() == pytest.approx(7.0, rel=0.03)
        assert abs(residual.mean()) < 0.2
        assert all(np.all(r.clean == 50.0) for r in records)
    again, _ = load_training_data(config, seed=1)
    np.testing.assert_array_equal(again[0].image, train[0].image)
    # without noise_sigma the images stay as they are and no clean copy is made
    plain, _ = load_training_data(DataConfig(train=root, validation=val_root), seed=1)
    assert plain[0].clean is None and np.all(plain[0].image == 50.0)


# --------------------------------------------------------------------------- normalisation


def test_normalization_stats():
    rng = np.random.default_rng(0)
    a = rng.normal(10, 2, size=(2, 30, 30)).astype(np.float32)
    b = rng.normal(10, 2, size=(2, 20, 40)).astype(np.float32)
    a[1] += 1000  # second channel has a large offset
    b[1] = b[1] * 3 + 1000
    records = [ImageRecord(a, None), ImageRecord(b, np.zeros((20, 40), np.int32))]
    norm = compute_normalization(records)
    pooled = np.concatenate([a.reshape(2, -1), b.reshape(2, -1)], axis=1).astype(np.float64)
    np.testing.assert_allclose(norm.mean, pooled.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(norm.std, pooled.std(axis=1), rtol=1e-5)
    restored = norm.denormalize(norm.normalize(a))
    np.testing.assert_allclose(restored, a, rtol=1e-5, atol=1e-3)
    batch = norm.normalize(np.stack([a[:, ::-1], a]), spatial_ndim=2)  # (N, C, Y, X): per channel, not per image
    np.testing.assert_array_equal(batch[1], norm.normalize(a))


def test_normalization_constant_image_floor():
    norm = compute_normalization([ImageRecord(np.full((1, 8, 8), 3.0, np.float32), None)])
    assert norm.mean == [3.0] and norm.std == [1e-6]


# --------------------------------------------------------------------------- patch sampler


def _records(n_lab: int, n_unlab: int, shape=(32, 32), channels: int = 1) -> list[ImageRecord]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n_lab + n_unlab):
        labels = None
        if i < n_lab:
            labels = np.zeros(shape, np.int32)
            labels[tuple(slice(2, 10) for _ in shape)] = 1
        out.append(ImageRecord(rng.normal(5, 2, size=(channels, *shape)).astype(np.float32), labels))
    return out


def test_sampler_shapes_and_dtypes():
    records = _records(2, 3, channels=2)
    norm = compute_normalization(records)
    sampler = PatchSampler(records, (16, 16), norm, foreground, INT_TARGET, seed=0)
    patches, targets, labelled = sampler.sample(10, np.random.default_rng(0))
    assert patches.shape == (10, 2, 16, 16) and patches.dtype == np.float32
    assert targets.shape == (10, 16, 16) and targets.dtype == np.int64
    assert labelled.shape == (10,) and labelled.dtype == bool
    assert sampler.labelled_count == 2
    assert np.all(targets[~labelled] == 0)
    # patches are normalised
    big, _, _ = sampler.sample(200, np.random.default_rng(1))
    assert abs(big.mean()) < 0.1 and big.std() == pytest.approx(1.0, abs=0.1)


def test_sampler_3d():
    records = _records(1, 1, shape=(10, 20, 20))
    sampler = PatchSampler(records, (8, 16, 16), compute_normalization(records), foreground, INT_TARGET)
    patches, targets, labelled = sampler.sample(4, np.random.default_rng(0))
    assert patches.shape == (4, 1, 8, 16, 16) and targets.shape == (4, 8, 16, 16)


def test_sampler_patch_size_dimension_mismatch():
    records = _records(1, 0, shape=(10, 20, 20))
    with pytest.raises(DataError, match="patch_size has 2 entries but the images are 3-D"):
        PatchSampler(records, (16, 16), compute_normalization(records), foreground, INT_TARGET)


def test_sampler_pads_small_images():
    records = _records(1, 0, shape=(12, 40))
    sampler = PatchSampler(records, (16, 16), compute_normalization(records), foreground, INT_TARGET, augment=False)
    patches, targets, _ = sampler.sample(3, np.random.default_rng(0))
    assert patches.shape == (3, 1, 16, 16)
    # reflect padding: row 12 mirrors row 10
    np.testing.assert_array_equal(patches[:, :, 12], patches[:, :, 10])
    np.testing.assert_array_equal(targets[:, 12], targets[:, 10])


def test_sampler_labelled_fraction():
    records = _records(1, 9)
    norm = compute_normalization(records)
    rng = np.random.default_rng(0)
    half = PatchSampler(records, (16, 16), norm, foreground, INT_TARGET, labelled_fraction=0.5)
    counts = [half.sample(10, rng)[2].sum() for _ in range(50)]
    # 5 from the labelled image, plus about 1 in 10 of the other 5
    assert min(counts) >= 5 and np.mean(counts) == pytest.approx(5.5, abs=0.3)
    uniform = PatchSampler(records, (16, 16), norm, foreground, INT_TARGET)
    assert np.mean([uniform.sample(10, rng)[2].sum() for _ in range(50)]) == pytest.approx(1.0, abs=0.3)
    unlabelled = PatchSampler(_records(0, 3), (16, 16), norm, foreground, INT_TARGET, labelled_fraction=0.5)
    assert unlabelled.labelled_count == 0 and not unlabelled.sample(8, rng)[2].any()


def test_uniform_sampling_weights_by_patch_positions():
    big = ImageRecord(np.zeros((1, 64, 64), np.float32), None)  # 49*49 positions for 16x16 patches
    small = ImageRecord(np.ones((1, 16, 16), np.float32), None)  # 1 position
    sampler = PatchSampler([big, small], (16, 16), Normalization([0.0], [1.0]), foreground, INT_TARGET)
    patches, _, _ = sampler.sample(4000, np.random.default_rng(0))
    from_small = (patches[:, 0, 0, 0] == 1).mean()
    assert from_small == pytest.approx(1 / (49 * 49 + 1), abs=0.002)


def test_augmentation_keeps_image_and_target_aligned():
    # An asymmetric pattern: an L shape whose target is the same L shape.
    labels = np.zeros((16, 16), np.int32)
    labels[2:12, 3] = 1
    labels[11, 3:9] = 1
    image = np.where(labels > 0, 10.0, 0.0).astype(np.float32)[np.newaxis]
    record = ImageRecord(image, labels)
    sampler = PatchSampler([record], (16, 16), Normalization([0.0], [1.0]), foreground, INT_TARGET, augment=True)
    patches, targets, _ = sampler.sample(200, np.random.default_rng(0))
    variants = set()
    for patch, target in zip(patches, targets):
        np.testing.assert_array_equal(patch[0] > 5, target == 1)
        variants.add(target.tobytes())
    assert len(variants) == 8  # all eight rotations/flips occur
    plain = PatchSampler([record], (16, 16), Normalization([0.0], [1.0]), foreground, INT_TARGET, augment=False)
    assert len({t.tobytes() for t in plain.sample(50, np.random.default_rng(0))[1]}) == 1


def test_augmentation_non_square_patch():
    records = _records(1, 0, shape=(40, 40))
    sampler = PatchSampler(records, (16, 24), compute_normalization(records), foreground, INT_TARGET)
    patches, targets, _ = sampler.sample(20, np.random.default_rng(0))
    assert patches.shape == (20, 1, 16, 24) and targets.shape == (20, 16, 24)


def test_augmentation_3d_rotates_yx_only():
    labels = np.zeros((8, 16, 16), np.int32)
    labels[1, 2:12, 3] = 1  # only in z-slice 1
    labels[1, 11, 3:9] = 1
    image = (labels * 10.0).astype(np.float32)[np.newaxis]
    sampler = PatchSampler([ImageRecord(image, labels)], (8, 16, 16), Normalization([0.0], [1.0]), foreground, INT_TARGET)
    patches, targets, _ = sampler.sample(40, np.random.default_rng(0))
    assert np.all(targets.sum(axis=(2, 3))[:, [0, 2, 3, 4, 5, 6, 7]] == 0)
    np.testing.assert_array_equal(patches[:, 0] > 5, targets == 1)


def test_sampler_targets_computed_once():
    calls = []

    def counting(labels: np.ndarray) -> np.ndarray:
        calls.append(1)
        return foreground(labels)

    records = _records(3, 2)
    sampler = PatchSampler(records, (16, 16), compute_normalization(records), counting, INT_TARGET)
    for _ in range(5):
        sampler.sample(8, np.random.default_rng(0))
    assert len(calls) == 3


def test_reading_data_does_not_load_the_model_builder():
    """Loading TIFFs and normalising them needs no network code (the checkpoint and model modules stay unloaded)."""
    code = "import sys, denoiseg_core.data; print(sorted(m for m in sys.modules if m in ('denoiseg_core.model', 'denoiseg_core.checkpoint')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_sampler_allocates_the_targets_the_head_declares():
    """A head with float (2, *spatial) targets (e.g. a probability and a distance map) gets
    batches of that dtype and shape, rotated and flipped together with the patches."""

    def two_maps(labels: np.ndarray) -> np.ndarray:
        inside = (labels > 0).astype(np.float32)
        return np.stack([inside, inside * 0.5])

    records = _records(2, 1, shape=(16, 16))  # every labelled patch holds a part of the object
    sampler = PatchSampler(records, (16, 16), compute_normalization(records), two_maps, TargetSpec("float32", 2))
    _, targets, labelled = sampler.sample(6, np.random.default_rng(0))
    assert targets.shape == (6, 2, 16, 16) and targets.dtype == np.float32 and labelled.any()
    np.testing.assert_array_equal(targets[:, 1], targets[:, 0] * 0.5)
    assert all(t.any() for t in targets[labelled]) and not targets[~labelled].any()
    with pytest.raises(ValueError, match="the head declares int64 of shape"):
        PatchSampler(records, (16, 16), compute_normalization(records), two_maps, INT_TARGET)
