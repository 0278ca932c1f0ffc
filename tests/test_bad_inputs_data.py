"""Every kind of bad training input raises a one-line DataError that names the offending file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from denoiseg_core.config import DataConfig
from denoiseg_core.data import load_folder, load_npz, load_training_data, to_channel_first, validate_mask
from denoiseg_core.errors import ConfigError, DataError


def _labels(shape=(32, 32)) -> np.ndarray:
    labels = np.zeros(shape, dtype=np.uint16)
    labels[4:12, 4:12] = 1
    labels[20:28, 18:30] = 2
    return labels


def _dataset(root: Path, n: int = 3, n_masks: int = 2, shape=(32, 32)) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        tifffile.imwrite(root / "images" / f"im{i}.tif", rng.normal(100, 10, size=shape).astype(np.float32))
        if i < n_masks:
            tifffile.imwrite(root / "masks" / f"im{i}.tif", _labels(shape))
    return root


def _assert_one_line_naming(exc_info, name: str) -> None:
    message = str(exc_info.value)
    assert "\n" not in message
    assert name in message


def test_missing_folder(tmp_path):
    with pytest.raises(DataError) as exc:
        load_folder(tmp_path / "nowhere")
    _assert_one_line_naming(exc, "nowhere")


def test_empty_folder(tmp_path):
    empty = tmp_path / "empty_set"
    empty.mkdir()
    with pytest.raises(DataError) as exc:
        load_folder(empty)
    _assert_one_line_naming(exc, "empty_set")


def test_images_subfolder_without_tiffs(tmp_path):
    (tmp_path / "ds" / "images").mkdir(parents=True)
    (tmp_path / "ds" / "images" / "README.txt").write_text("nothing here")
    with pytest.raises(DataError) as exc:
        load_folder(tmp_path / "ds")
    _assert_one_line_naming(exc, "images")


def test_non_image_file_with_tif_suffix(tmp_path):
    root = _dataset(tmp_path / "ds")
    (root / "images" / "notes.tif").write_text("this is not an image")
    with pytest.raises(DataError) as exc:
        load_folder(root)
    _assert_one_line_naming(exc, "notes.tif")


def test_corrupt_tiff(tmp_path):
    root = _dataset(tmp_path / "ds")
    good = (root / "images" / "im0.tif").read_bytes()
    (root / "images" / "truncated.tif").write_bytes(good[: len(good) // 3])
    with pytest.raises(DataError) as exc:
        load_folder(root)
    _assert_one_line_naming(exc, "truncated.tif")


def test_shape_mismatch(tmp_path):
    root = _dataset(tmp_path / "ds")
    tifffile.imwrite(root / "masks" / "im1.tif", _labels((32, 40)))
    with pytest.raises(DataError) as exc:
        load_folder(root)
    _assert_one_line_naming(exc, "im1.tif")
    assert "shape" in str(exc.value)


def test_float_mask(tmp_path):
    root = _dataset(tmp_path / "ds")
    tifffile.imwrite(root / "masks" / "im1.tif", _labels().astype(np.float32) * 0.5)
    with pytest.raises(DataError) as exc:
        load_folder(root)
    _assert_one_line_naming(exc, "im1.tif")
    assert "non-integer" in str(exc.value)


def test_float_mask_with_whole_numbers_is_accepted(tmp_path):
    root = _dataset(tmp_path / "ds")
    tifffile.imwrite(root / "masks" / "im1.tif", _labels().astype(np.float32))
    records = load_folder(root)
    assert records[1].labels.dtype == np.int32
    assert set(np.unique(records[1].labels)) == {0, 1, 2}


def test_negative_mask(tmp_path):
    root = _dataset(tmp_path / "ds")
    labels = _labels().astype(np.int16)
    labels[0, 0] = -1
    tifffile.imwrite(root / "masks" / "im0.tif", labels)
    with pytest.raises(DataError) as exc:
        load_folder(root)
    _assert_one_line_naming(exc, "im0.tif")
    assert "negative" in str(exc.value)


def test_nan_in_image(tmp_path):
    root = _dataset(tmp_path / "ds")
    image = np.ones((32, 32), dtype=np.float32)
    image[3, 3] = np.nan
    tifffile.imwrite(root / "images" / "im2.tif", image)
    with pytest.raises(DataError) as exc:
        load_folder(root)
    _assert_one_line_naming(exc, "im2.tif")
    assert "NaN" in str(exc.value)


def test_inf_in_image(tmp_path):
    root = _dataset(tmp_path / "ds")
    image = np.ones((32, 32), dtype=np.float32)
    image[3, 3] = np.inf
    tifffile.imwrite(root / "images" / "im2.tif", image)
    with pytest.raises(DataError) as exc:
        load_folder(root)
    _assert_one_line_naming(exc, "im2.tif")


def test_3d_image_among_2d(tmp_path):
    root = _dataset(tmp_path / "ds")
    tifffile.imwrite(root / "images" / "stack.tif", np.ones((12, 32, 32), dtype=np.float32))
    with pytest.raises(DataError) as exc:
        load_folder(root)
    _assert_one_line_naming(exc, "stack.tif")
    assert "3-D" in str(exc.value)


def test_channel_count_mismatch(tmp_path):
    root = _dataset(tmp_path / "ds", n_masks=0)
    for name, channels in (("im0.tif", 2), ("im1.tif", 3), ("im2.tif", 2)):
        image = np.ones((channels, 32, 32), dtype=np.float32)
        tifffile.imwrite(root / "images" / name, image, photometric="minisblack")
    with pytest.raises(DataError) as exc:
        load_folder(root, axes="CYX")
    _assert_one_line_naming(exc, "im1.tif")
    assert "channel" in str(exc.value)


def test_mask_without_image(tmp_path):
    root = _dataset(tmp_path / "ds")
    tifffile.imwrite(root / "masks" / "orphan.tif", _labels())
    with pytest.raises(DataError) as exc:
        load_folder(root)
    _assert_one_line_naming(exc, "orphan.tif")


def test_required_mask_missing(tmp_path):
    root = _dataset(tmp_path / "ds", n=3, n_masks=2)
    with pytest.raises(DataError) as exc:
        load_folder(root, require_masks=True)
    _assert_one_line_naming(exc, "im2.tif")


def test_other_files_are_ignored(tmp_path):
    root = _dataset(tmp_path / "ds")
    (root / "images" / "README").write_text("about these images")
    (root / "images" / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "images" / "._im0.tif").write_bytes(b"\x00\x01")  # macOS resource fork
    (root / "masks" / "notes.txt").write_text("x")
    assert len(load_folder(root)) == 3


def test_bad_axes_for_array():
    with pytest.raises(DataError) as exc:
        to_channel_first(np.zeros((4, 4, 4, 4)), "auto", Path("four_d.tif"))
    _assert_one_line_naming(exc, "four_d.tif")
    with pytest.raises(DataError):
        to_channel_first(np.zeros((4, 4)), "CZYX", Path("x.tif"))


def test_validate_mask_direct():
    with pytest.raises(DataError) as exc:
        validate_mask(np.zeros((5, 5)), (5, 6), Path("m.tif"))
    _assert_one_line_naming(exc, "m.tif")
    # a singleton axis is dropped when that makes the shapes agree
    assert validate_mask(np.ones((1, 5, 6), dtype=np.uint8), (5, 6), None).shape == (5, 6)
    # a boolean mask becomes one instance per connected component
    binary = np.zeros((5, 6), dtype=bool)
    binary[0, 0] = binary[4, 5] = True
    assert validate_mask(binary, (5, 6), None).max() == 2


def test_npz_missing_keys(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, X_train=np.zeros((2, 16, 16)), Y_train=np.zeros((2, 16, 16)))
    with pytest.raises(DataError) as exc:
        load_npz(path)
    _assert_one_line_naming(exc, "bad.npz")
    assert "X_val" in str(exc.value) and "Y_val" in str(exc.value)


def test_npz_not_an_archive(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_text("not a zip")
    with pytest.raises(DataError) as exc:
        load_npz(path)
    _assert_one_line_naming(exc, "garbage.npz")


def test_npz_negative_labels(tmp_path):
    path = tmp_path / "neg.npz"
    y = np.zeros((2, 16, 16), dtype=np.int32)
    y[1, 0, 0] = -3
    np.savez(path, X_train=np.zeros((2, 16, 16)), Y_train=y, X_val=np.zeros((1, 16, 16)), Y_val=np.zeros((1, 16, 16)))
    with pytest.raises(DataError) as exc:
        load_npz(path)
    _assert_one_line_naming(exc, "neg.npz")
    assert "Y_train[1]" in str(exc.value)


def test_training_data_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.train is not set"):
        load_training_data(DataConfig(), seed=0)
    unlabelled = _dataset(tmp_path / "unlabelled", n_masks=0)
    with pytest.raises(DataError) as exc:
        load_training_data(DataConfig(train=unlabelled), seed=0)
    _assert_one_line_naming(exc, "unlabelled")
    labelled = _dataset(tmp_path / "labelled", n=6, n_masks=4)
    with pytest.raises(ConfigError, match="n_labelled=4"):
        # one of the 4 labelled images is held out for validation
        load_training_data(DataConfig(train=labelled, n_labelled=4), seed=0)
    with pytest.raises(DataError) as exc:
        load_training_data(DataConfig(train=labelled, pixel_limit=100), seed=0)
    assert "pixel_limit" in str(exc.value)
