"""Every user mistake listed in the brief gives one line naming the file and the problem, and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cli_helpers import run_cli


def _dataset(root: Path, n: int = 3, shape=(32, 32)) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        tifffile.imwrite(root / "images" / f"img{i}.tif", rng.normal(100, 10, shape).astype(np.float32))
        labels = np.zeros(shape, np.uint16)
        labels[4:12, 4:12] = 1
        tifffile.imwrite(root / "masks" / f"img{i}.tif", labels)
    return root


def _config(tmp_path: Path, train: Path, **extra) -> Path:
    path = tmp_path / "config.yaml"
    lines = [
        f"run_dir: {tmp_path / 'run'}",
        "data:",
        f"  train: {train}",
        "  patch_size: [16, 16]",
        "model:",
        "  backbone: {name: unet, params: {depth: 2, first_filters: 4}}",
        "training: {epochs: 1, steps_per_epoch: 1, batch_size: 2, device: cpu}",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def _break_missing_file(root: Path) -> tuple[Path, str]:
    return root / "gone", "folder not found"


def _break_non_image(root: Path) -> tuple[Path, str]:
    (root / "images" / "notes.tif").write_text("this is not an image")
    return root, "notes.tif"


def _break_corrupt(root: Path) -> tuple[Path, str]:
    path = root / "images" / "img1.tif"
    path.write_bytes(path.read_bytes()[:200])
    return root, "img1.tif"


def _break_shape(root: Path) -> tuple[Path, str]:
    tifffile.imwrite(root / "masks" / "img0.tif", np.zeros((20, 20), np.uint16))
    return root, "img0.tif"


def _break_float_mask(root: Path) -> tuple[Path, str]:
    tifffile.imwrite(root / "masks" / "img0.tif", np.full((32, 32), 0.5, np.float32))
    return root, "img0.tif"


def _break_negative_mask(root: Path) -> tuple[Path, str]:
    tifffile.imwrite(root / "masks" / "img0.tif", np.full((32, 32), -1, np.int16))
    return root, "img0.tif"


def _break_nan(root: Path) -> tuple[Path, str]:
    image = np.ones((32, 32), np.float32)
    image[3, 3] = np.nan
    tifffile.imwrite(root / "images" / "img2.tif", image)
    return root, "img2.tif"


def _break_empty(root: Path) -> tuple[Path, str]:
    for p in (root / "images").iterdir():
        p.unlink()
    for p in (root / "masks").iterdir():
        p.unlink()
    return root, "images"


def _break_mixed_dims(root: Path) -> tuple[Path, str]:
    tifffile.imwrite(root / "images" / "img2.tif", np.ones((4, 32, 32), np.float32))
    return root, "img2.tif"


@pytest.mark.parametrize(
    "breaker",
    [
        _break_missing_file,
        _break_non_image,
        _break_corrupt,
        _break_shape,
        _break_float_mask,
        _break_negative_mask,
        _break_nan,
        _break_empty,
        _break_mixed_dims,
    ],
    ids=lambda f: f.__name__.removeprefix("_break_"),
)
def test_train_on_bad_data_gives_one_line_naming_the_file(tmp_path, capsys, breaker):
    root = _dataset(tmp_path / "data")
    train, name = breaker(root)
    code, _, err = run_cli(["train", str(_config(tmp_path, train)), "--no-progress"], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and name in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "last.pt").exists()


def test_unknown_component_names_what_is_installed(tmp_path, capsys):
    config = _config(tmp_path, _dataset(tmp_path / "data"))
    code, _, err = run_cli(["train", str(config), "--set", "model.masking.name=n3v", "--no-progress"], capsys)
    assert code == 2
    assert "unknown masking 'n3v'" in err and "n2v" in err
    assert len(err.strip().splitlines()) == 1


def test_missing_config_file(tmp_path, capsys):
    code, _, err = run_cli(["train", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "nope.yaml" in err and "not found" in err


def test_3d_image_for_a_2d_model_via_the_real_console_script(tmp_path, capsys):
    """The installed `denoiseg` script itself (not just main()) exits 2 with one line."""
    root = _dataset(tmp_path / "data")
    code, _, err = run_cli(["train", str(_config(tmp_path, root)), "--no-progress"], capsys)
    assert code == 0, err
    volume = tmp_path / "volume.tif"
    tifffile.imwrite(volume, np.ones((4, 32, 32), np.float32))
    proc = subprocess.run(
        [sys.executable, "-m", "denoiseg_core", "predict", str(tmp_path / "run"), str(volume), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "volume.tif" in proc.stderr and "3-D" in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
