"""The synthetic nuclei generator: shapes, labels, noise level and the written data set."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from denoiseg_core.data import load_folder
from denoiseg_core.errors import DataError
from denoiseg_core.synthetic import BACKGROUND_LEVEL, make_nuclei_image, write_synthetic_dataset


@pytest.mark.parametrize("shape", [(96, 80), (16, 48, 48)])
def test_make_nuclei_image(shape):
    clean, noisy, labels = make_nuclei_image(shape, np.random.default_rng(0), noise_sigma=10.0)
    assert clean.shape == noisy.shape == labels.shape == shape
    assert clean.dtype == noisy.dtype == np.float32 and labels.dtype == np.int32
    n = labels.max()
    assert n >= 3
    # labels are 1..n, each one connected region
    assert set(np.unique(labels)) == set(range(n + 1))
    for label in range(1, n + 1):
        assert ndimage.label(labels == label)[1] == 1
    # nuclei are brighter than the background
    assert clean[labels > 0].mean() > 3 * clean[labels == 0].mean()
    assert clean[labels == 0].mean() == pytest.approx(BACKGROUND_LEVEL, rel=0.5)
    # the noise is what was asked for
    assert (noisy - clean).std() == pytest.approx(10.0, rel=0.05)


def test_reproducible_and_varied():
    a = make_nuclei_image((64, 64), np.random.default_rng(3))
    b = make_nuclei_image((64, 64), np.random.default_rng(3))
    c = make_nuclei_image((64, 64), np.random.default_rng(4))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[2], c[2])


def test_touching_nuclei_occur():
    touching = 0
    for seed in range(5):
        _, _, labels = make_nuclei_image((128, 128), np.random.default_rng(seed))
        # two different labels side by side
        right = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
        down = (labels[1:] != labels[:-1]) & (labels[1:] > 0) & (labels[:-1] > 0)
        touching += int(right.any() or down.any())
    assert touching >= 2


def test_n_objects_and_poisson_noise():
    rng = np.random.default_rng(0)
    clean, noisy, labels = make_nuclei_image((128, 128), rng, n_objects=3, noise_sigma=0.0, poisson_gain=2.0)
    assert 1 <= labels.max() <= 3
    residual = noisy - clean
    # shot noise grows with brightness
    assert residual[labels > 0].std() > 1.5 * residual[labels == 0].std()


def test_write_synthetic_dataset(tmp_path):
    sizes = dict(n_train=4, n_labelled=2, n_val=1, n_test=2, shape=(48, 48), seed=1)
    folders = write_synthetic_dataset(tmp_path / "syn", **sizes)
    train = load_folder(folders["train"])
    assert len(train) == 4 and sum(r.labels is not None for r in train) == 2
    val = load_folder(folders["val"], require_masks=True)
    test = load_folder(folders["test"], require_masks=True)
    assert len(val) == 1 and len(test) == 2
    assert sorted(p.name for p in folders["test_clean"].iterdir()) == ["test_000.tif", "test_001.tif"]
    assert test[0].labels.max() >= 1
    # the same seed writes the same data; existing files are not overwritten silently
    with pytest.raises(DataError, match="exists"):
        write_synthetic_dataset(tmp_path / "syn", **sizes)
    again = write_synthetic_dataset(tmp_path / "syn2", **sizes)
    np.testing.assert_array_equal(load_folder(again["test"])[1].image, test[1].image)
