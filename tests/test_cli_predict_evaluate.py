"""`denoiseg predict` and `denoiseg evaluate` end to end, with an untrained tiny checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from typer.testing import CliRunner

from denoiseg_core.checkpoint import load_checkpoint, save_checkpoint
from denoiseg_core.cli import build_app
from denoiseg_core.config import DenoiSegConfig
from denoiseg_core.data import Normalization
from denoiseg_core.errors import DataError
from denoiseg_core.metrics import evaluate_segmentation, psnr
from denoiseg_core.model import build_model
from denoiseg_core.evaluation import run_precision, segment
from denoiseg_core.prediction import predict_image

SHAPE_2D = (40, 52)


def make_checkpoint(path: Path, ndim: int = 2, axes: str = "auto", channels: int = 1, seed: int = 0) -> Path:
    """An untrained depth-2 U-Net checkpoint with tuned threshold 0.4."""
    config = DenoiSegConfig.model_validate(
        {
            "data": {"axes": axes},
            "model": {"backbone": {"name": "unet", "params": {"depth": 2, "first_filters": 8}}},
        }
    )
    torch.manual_seed(seed)
    built = build_model(config, ndim=ndim, in_channels=channels)
    normalization = Normalization(mean=[100.0] * channels, std=[25.0] * channels)
    save_checkpoint(path, config=config, built=built, normalization=normalization, instance_settings=built.head.settings(threshold=0.4))
    return path


def disks_image(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(noisy uint16 image, clean float32 image, instance labels) with a few disks."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape)
    labels = np.zeros(shape, dtype=np.uint16)
    for label in range(1, 4):
        centre = rng.uniform(0.25, 0.75, len(shape)) * np.array(shape)
        radius = rng.uniform(3, 7)
        labels[((grid - centre.reshape(-1, *[1] * len(shape))) ** 2).sum(0) < radius**2] = label
    clean = np.where(labels > 0, 160.0, 80.0).astype(np.float32)
    noisy = np.clip(clean + rng.normal(0, 20, shape), 0, None).astype(np.uint16)
    return noisy, clean, labels


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    folders = {name: root / name for name in ("images", "masks", "clean")}
    for folder in folders.values():
        folder.mkdir()
    for i in range(2):
        noisy, clean, labels = disks_image(SHAPE_2D, seed=i)
        tifffile.imwrite(folders["images"] / f"img{i}.tif", noisy)
        tifffile.imwrite(folders["masks"] / f"img{i}.tif", labels)
        tifffile.imwrite(folders["clean"] / f"img{i}.tif", clean)
    single = root / "single.tif"
    tifffile.imwrite(single, disks_image((33, 29), seed=7)[0])
    volume = root / "volume.tif"
    tifffile.imwrite(volume, disks_image((8, 24, 24), seed=3)[0])
    return {
        "root": root,
        **folders,
        "single": single,
        "volume": volume,
        "checkpoint": make_checkpoint(root / "model.pt"),
    }


def invoke(*args: str):
    return CliRunner().invoke(build_app(), [str(a) for a in args])


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real console entry point in a fresh process (exit code and stderr as a user sees them)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", "from denoiseg_core.cli import main; main()", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


# --------------------------------------------------------------------------- predict


def test_predict_writes_outputs_matching_predict_image(workspace, tmp_path):
    out = tmp_path / "out"
    result = invoke(
        "predict", workspace["checkpoint"], workspace["images"], workspace["single"],
        "--out", out, "--probabilities", "--device", "cpu",
    )
    assert result.exit_code == 0, result.output
    model = load_checkpoint(workspace["checkpoint"])
    for name, shape in (("img0", SHAPE_2D), ("img1", SHAPE_2D), ("single", (33, 29))):
        denoised = tifffile.imread(out / f"{name}_denoised.tif")
        labels = tifffile.imread(out / f"{name}_labels.tif")
        probabilities = tifffile.imread(out / f"{name}_probabilities.tif")
        assert denoised.shape == shape and denoised.dtype == np.float32
        assert labels.shape == shape and labels.dtype in (np.uint16, np.int32)
        assert probabilities.shape == (3, *shape) and probabilities.dtype == np.float32
        np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-4)
        source = workspace["single"] if name == "single" else workspace["images"] / f"{name}.tif"
        expected = predict_image(model, tifffile.imread(source).astype(np.float32)[None], precision="auto")  # as the CLI default
        np.testing.assert_allclose(denoised, expected.denoised[0], rtol=1e-5, atol=1e-3)
        np.testing.assert_array_equal(labels, segment(model, expected))  # tuned threshold 0.4
    assert "img0.tif" in result.output and "single.tif" in result.output  # summary table
    assert not list(out.glob(".*"))  # no leftover temporary files from the atomic writes


def test_threshold_outside_the_heads_range_is_one_line(workspace, tmp_path):
    result = run_cli("predict", workspace["checkpoint"], workspace["single"], "-o", tmp_path / "out", "--threshold", "1.5")
    assert_one_line_error(result, "--threshold 1.5", "less than 1", "the head's threshold")
    assert not (tmp_path / "out").exists()


def test_predict_threshold_option_overrides_tuned_threshold(workspace, tmp_path):
    low, high = tmp_path / "low", tmp_path / "high"
    for folder, threshold in ((low, "0.2"), (high, "0.6")):
        result = invoke("predict", workspace["checkpoint"], workspace["single"], "-o", folder, "--threshold", threshold)
        assert result.exit_code == 0, result.output
    model = load_checkpoint(workspace["checkpoint"])
    prediction = predict_image(model, tifffile.imread(workspace["single"]).astype(np.float32)[None], precision="auto")
    for folder, threshold in ((low, 0.2), (high, 0.6)):
        labels = tifffile.imread(folder / "single_labels.tif")
        np.testing.assert_array_equal(labels, segment(model, prediction, model.instance_settings.with_threshold(threshold)))
    foreground = {folder: (tifffile.imread(folder / "single_labels.tif") > 0).sum() for folder in (low, high)}
    assert foreground[low] >= foreground[high]


def test_predict_tiled_matches_whole_image(workspace, tmp_path):
    image = tmp_path / "large.tif"
    tifffile.imwrite(image, disks_image((100, 90), seed=5)[0])
    whole, tiled = tmp_path / "whole", tmp_path / "tiled"
    assert invoke("predict", workspace["checkpoint"], image, "-o", whole).exit_code == 0
    result = invoke("predict", workspace["checkpoint"], image, "-o", tiled, "--tile", "64,64", "--batch-size", "3")
    assert result.exit_code == 0, result.output
    a = tifffile.imread(whole / "large_denoised.tif")
    b = tifffile.imread(tiled / "large_denoised.tif")
    assert np.abs(a - b).max() < 1e-2  # raw intensity units (std 25)
    np.testing.assert_array_equal(tifffile.imread(whole / "large_labels.tif"), tifffile.imread(tiled / "large_labels.tif"))


def test_predict_accepts_a_run_folder(workspace, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(workspace["checkpoint"].read_bytes())
    result = invoke("predict", run, workspace["single"], "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "single_labels.tif").is_file()


def test_a_run_folder_denoises_with_its_best_denoising_checkpoint(workspace, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(workspace["checkpoint"].read_bytes())
    make_checkpoint(run / "best_denoising.pt", seed=1)
    image = tifffile.imread(workspace["single"]).astype(np.float32)[None]
    segmenter, denoiser = load_checkpoint(run / "best.pt"), load_checkpoint(run / "best_denoising.pt")
    expected = {name: predict_image(m, image, precision="auto") for name, m in (("seg", segmenter), ("dn", denoiser))}
    assert np.abs(expected["seg"].denoised - expected["dn"].denoised).max() > 1e-2  # the two differ

    for choice, source in (("auto", "dn"), ("same", "seg"), (str(run / "best_denoising.pt"), "dn")):
        out = tmp_path / f"out_{source}_{len(choice)}"
        result = invoke("predict", run, workspace["single"], "-o", out, "--denoiser", choice)
        assert result.exit_code == 0, result.output
        np.testing.assert_allclose(tifffile.imread(out / "single_denoised.tif"), expected[source].denoised[0],
                                   rtol=1e-5, atol=1e-3)
        # the labels always come from the segmentation checkpoint
        np.testing.assert_array_equal(tifffile.imread(out / "single_labels.tif"), segment(segmenter, expected["seg"]))
    # a checkpoint file (not a run folder) denoises with itself by default
    out = tmp_path / "file"
    assert invoke("predict", run / "best.pt", workspace["single"], "-o", out).exit_code == 0
    np.testing.assert_allclose(tifffile.imread(out / "single_denoised.tif"), expected["seg"].denoised[0], rtol=1e-5, atol=1e-3)


def test_a_denoiser_that_does_not_fit_is_a_one_line_error(workspace, tmp_path):
    other = make_checkpoint(tmp_path / "rgb.pt", channels=3, axes="CYX")
    result = run_cli("predict", workspace["checkpoint"], workspace["single"], "-o", tmp_path / "out", "--denoiser", other)
    assert_one_line_error(result, "--denoiser", "rgb.pt", "3 channel(s)")
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_without_overwrite(workspace, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    existing = out / "img1_labels.tif"
    existing.write_bytes(b"precious")
    result = run_cli("predict", workspace["checkpoint"], workspace["images"], "-o", out)
    assert_one_line_error(result, str(existing), "--overwrite")
    assert existing.read_bytes() == b"precious"
    assert sorted(p.name for p in out.iterdir()) == ["img1_labels.tif"]  # nothing else was written first

    again = invoke("predict", workspace["checkpoint"], workspace["images"], "-o", out, "--overwrite")
    assert again.exit_code == 0, again.output
    assert tifffile.imread(existing).shape == SHAPE_2D


def test_3d_input_for_2d_model_is_a_one_line_error(workspace, tmp_path):
    out = tmp_path / "out"
    result = run_cli("predict", workspace["checkpoint"], workspace["single"], workspace["volume"], "-o", out)
    assert_one_line_error(result, "volume.tif", "3-D image but the model was trained on 2-D images")
    assert not out.exists() or not any(out.iterdir())


def test_non_checkpoint_is_a_one_line_error(workspace, tmp_path):
    result = run_cli("predict", workspace["single"], workspace["single"], "-o", tmp_path / "out")
    assert_one_line_error(result, "single.tif", "checkpoint")


def test_output_may_not_overwrite_an_input(workspace, tmp_path):
    victim = tmp_path / "x_labels.tif"
    tifffile.imwrite(victim, disks_image((33, 29), seed=1)[0])
    source = tmp_path / "x.tif"
    source.write_bytes(workspace["single"].read_bytes())
    before = victim.read_bytes()
    result = invoke("predict", workspace["checkpoint"], source, victim, "-o", tmp_path, "--overwrite")
    assert isinstance(result.exception, DataError) and "input" in str(result.exception)
    assert victim.read_bytes() == before


def test_bad_tile_option_is_an_error(workspace, tmp_path):
    result = invoke("predict", workspace["checkpoint"], workspace["single"], "-o", tmp_path, "--tile", "64,64,64")
    assert result.exit_code != 0 and "--tile" in str(result.exception)


def test_predict_3d_model(tmp_path, workspace):
    checkpoint = make_checkpoint(tmp_path / "model3d.pt", ndim=3)
    out = tmp_path / "out"
    result = invoke("predict", checkpoint, workspace["volume"], "-o", out, "--probabilities", "--tile", "8,16,16")
    assert result.exit_code == 0, result.output
    assert tifffile.imread(tmp_path / "out" / "volume_denoised.tif").shape == (8, 24, 24)
    assert tifffile.imread(tmp_path / "out" / "volume_labels.tif").shape == (8, 24, 24)
    assert tifffile.imread(tmp_path / "out" / "volume_probabilities.tif").shape == (3, 8, 24, 24)


def test_predict_multichannel_keeps_channel_axis_and_checks_channels(tmp_path, workspace):
    checkpoint = make_checkpoint(tmp_path / "model2c.pt", axes="CYX", channels=2)
    image = tmp_path / "two.tif"
    tifffile.imwrite(image, np.stack([disks_image(SHAPE_2D, 0)[0], disks_image(SHAPE_2D, 1)[0]]))
    result = invoke("predict", checkpoint, image, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert tifffile.imread(tmp_path / "out" / "two_denoised.tif").shape == (2, *SHAPE_2D)
    three = tmp_path / "three.tif"
    tifffile.imwrite(three, np.zeros((3, *SHAPE_2D), np.uint16), photometric="minisblack")
    result = invoke("predict", checkpoint, three, "-o", tmp_path / "out3")
    assert isinstance(result.exception, DataError)
    assert "3 channel(s) but the model was trained on 2" in str(result.exception)


# --------------------------------------------------------------------------- evaluate


def test_evaluate_writes_json_with_metrics(workspace, tmp_path):
    report = tmp_path / "metrics.json"
    result = invoke(
        "evaluate", workspace["checkpoint"], "--images", workspace["images"], "--masks", workspace["masks"],
        "--clean", workspace["clean"], "--json", report, "--threshold", "0.3",
    )
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert {"ap50", "map", "seg", "per_image", "psnr", "psnr_input", "instance_settings"} <= set(data)
    assert data["instance_settings"] == {"threshold": 0.3} and data["n_images"] == 2
    assert [row["name"] for row in data["per_image"]] == ["img0.tif", "img1.tif"]
    # same numbers as scoring the predictions directly, at the run's precision (as threshold tuning does)
    model = load_checkpoint(workspace["checkpoint"])
    precision = run_precision(model.config, model.ndim, torch.device("cpu"))
    assert data["precision"] == precision
    gts, preds = [], []
    for name in ("img0.tif", "img1.tif"):
        image = tifffile.imread(workspace["images"] / name).astype(np.float32)[None]
        preds.append(segment(model, predict_image(model, image, precision=precision), model.instance_settings.with_threshold(0.3)))
        gts.append(tifffile.imread(workspace["masks"] / name).astype(np.int32))
    expected = evaluate_segmentation(gts, preds)
    assert data["ap50"] == pytest.approx(expected["ap50"])
    assert data["seg"] == pytest.approx(expected["seg"])
    assert np.isfinite(data["psnr"]) and np.isfinite(data["psnr_input"])
    assert "AP@0.5" in result.output and "PSNR" in result.output


def test_evaluate_on_a_run_folder_scores_the_denoising_of_its_best_denoising_checkpoint(workspace, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(workspace["checkpoint"].read_bytes())
    make_checkpoint(run / "best_denoising.pt", seed=1)
    segmenter, denoiser = load_checkpoint(run / "best.pt"), load_checkpoint(run / "best_denoising.pt")
    args = ("--images", workspace["images"], "--masks", workspace["masks"], "--clean", workspace["clean"])
    reports = {}
    for choice in ("auto", "same"):
        reports[choice] = tmp_path / f"{choice}.json"
        result = invoke("evaluate", run, *args, "--json", reports[choice], "--denoiser", choice)
        assert result.exit_code == 0, result.output
    auto, same = (json.loads(reports[c].read_text()) for c in ("auto", "same"))
    assert auto["denoising_checkpoint"].endswith("best_denoising.pt") and same["denoising_checkpoint"].endswith("best.pt")
    assert "best_denoising.pt" in invoke("evaluate", run, *args).output

    def expected_psnr(model) -> float:
        values = []
        for name in ("img0.tif", "img1.tif"):
            image = tifffile.imread(workspace["images"] / name).astype(np.float32)[None]
            clean = tifffile.imread(workspace["clean"] / name).astype(np.float32)[None]
            precision = run_precision(model.config, model.ndim, torch.device("cpu"))
            values.append(psnr(clean, predict_image(model, image, precision=precision).denoised))
        return float(np.mean(values))

    assert auto["psnr"] == pytest.approx(expected_psnr(denoiser), abs=1e-3)
    assert same["psnr"] == pytest.approx(expected_psnr(segmenter), abs=1e-3)
    assert abs(auto["psnr"] - same["psnr"]) > 1e-2  # the two checkpoints denoise differently
    # segmentation is best.pt's either way
    assert auto["ap50"] == same["ap50"] and auto["per_image"] == [
        {**row, "psnr": a["psnr"]} for row, a in zip(same["per_image"], auto["per_image"])
    ]


def test_evaluate_refuses_a_denoiser_file_it_could_not_score(workspace, tmp_path):
    # without --clean there is no PSNR, so a --denoiser FILE would be ignored without a word
    other = make_checkpoint(tmp_path / "other.pt", seed=1)
    report = tmp_path / "report.json"
    result = run_cli("evaluate", workspace["checkpoint"], "--images", workspace["images"], "--masks", workspace["masks"],
                     "--json", report, "--denoiser", other)
    assert_one_line_error(result, "--denoiser", "other.pt", "--clean")
    assert not report.exists()


def test_evaluate_prints_only_without_json(workspace, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("evaluate", workspace["checkpoint"], "--images", workspace["images"], "--masks", workspace["masks"])
    assert result.exit_code == 0, result.output
    assert "mean (2 images)" in result.output
    assert list(tmp_path.iterdir()) == []


def test_evaluate_missing_mask_names_the_image(workspace, tmp_path):
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "img0.tif").write_bytes((workspace["masks"] / "img0.tif").read_bytes())
    result = run_cli("evaluate", workspace["checkpoint"], "--images", workspace["images"], "--masks", masks)
    assert_one_line_error(result, "img1.tif", "no mask")
