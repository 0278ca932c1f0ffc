"""The napari plugin's Qt-free parts: layers -> training folder, tiled prediction with
progress. They need neither napari nor a display, so they run everywhere."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import tifffile

from denoiseg_core.data import load_training_data
from denoiseg_core.config import DataConfig
from denoiseg_core.errors import DataError
from denoiseg_napari.layer_data import ImageLayer, default_axes, parse_patch_size, write_training_data


def stack(n: int, shape=(32, 32), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def painted(n: int, which: list[int], shape=(32, 32)) -> np.ndarray:
    labels = np.zeros((n, *shape), np.int32)
    for index in which:
        labels[index, 4:12, 4:12] = 1
        labels[index, 16:26, 10:20] = 2
    return labels


def test_unpainted_slices_are_unlabelled_and_the_trainer_reads_the_folder(tmp_path):
    layers = [ImageLayer("raw stack", stack(5), "SYX"), ImageLayer("other", stack(2, seed=1), "SYX")]
    folders = write_training_data(tmp_path / "data", layers, painted(5, [1, 3]))
    assert (folders.n_images, folders.n_labelled, folders.validation) == (7, 2, None)
    images = sorted(p.name for p in (folders.train / "images").iterdir())
    assert images == [f"other_{i:04d}.tif" for i in range(2)] + [f"raw_stack_{i:04d}.tif" for i in range(5)]
    assert sorted(p.name for p in (folders.train / "masks").iterdir()) == ["raw_stack_0001.tif", "raw_stack_0003.tif"]
    np.testing.assert_array_equal(tifffile.imread(folders.train / "images" / "raw_stack_0002.tif"), layers[0].data[2])
    train, validation = load_training_data(DataConfig(train=folders.train), seed=0)
    assert len(train) == 6 and len(validation) == 1  # one of the two labelled images is held out
    assert sum(r.labels is not None for r in train) == 1

    # Erasing the paint of a slice makes it unlabelled again; the folder is rewritten.
    folders = write_training_data(tmp_path / "data", layers, painted(5, [3]))
    assert sorted(p.name for p in (folders.train / "masks").iterdir()) == ["raw_stack_0003.tif"]
    # A single labelled image validates too (the held-out split needs two).
    assert folders.validation is not None and folders.n_labelled == 1
    assert sorted(p.name for p in (folders.validation / "masks").iterdir()) == ["raw_stack_0003.tif"]
    train, validation = load_training_data(DataConfig(train=folders.train, validation=folders.validation), seed=0)
    assert len(train) == 7 and len(validation) == 1


def test_volumes_are_labelled_only_in_their_painted_slices(tmp_path):
    volume = np.random.default_rng(0).normal(size=(8, 32, 32)).astype(np.float32)
    labels = np.zeros(volume.shape, np.int32)
    labels[2:5, 4:12, 4:12] = 1  # z 2..4 painted
    labels[6, 20:28, 20:28] = 2  # and z 6
    folders = write_training_data(tmp_path / "zyx", [ImageLayer("vol", volume, "ZYX")], labels)
    # the whole volume for denoising; each painted run of slices as its own labelled sub-volume
    assert sorted(p.name for p in (folders.train / "images").iterdir()) == [
        "vol_0000.tif", "vol_0000_z0002-0004.tif", "vol_0000_z0006-0006.tif"
    ]
    assert sorted(p.name for p in (folders.train / "masks").iterdir()) == ["vol_0000_z0002-0004.tif", "vol_0000_z0006-0006.tif"]
    np.testing.assert_array_equal(tifffile.imread(folders.train / "images" / "vol_0000_z0002-0004.tif"), volume[2:5])
    np.testing.assert_array_equal(tifffile.imread(folders.train / "masks" / "vol_0000_z0002-0004.tif"), labels[2:5])
    assert (folders.n_images, folders.n_labelled) == (3, 2)
    # every slice painted: the volume itself is labelled
    labels[:, 0, 0] = 3
    folders = write_training_data(tmp_path / "full", [ImageLayer("vol", volume, "ZYX")], labels)
    assert sorted(p.name for p in (folders.train / "masks").iterdir()) == ["vol_0000.tif"]
    # a stack of volumes: unpainted volumes stay unlabelled
    volumes = np.stack([volume, volume + 1])
    stacked = np.stack([labels, np.zeros_like(labels)])
    folders = write_training_data(tmp_path / "szyx", [ImageLayer("vols", volumes, "SZYX")], stacked)
    assert (folders.n_images, folders.n_labelled) == (2, 1)
    train, validation = load_training_data(DataConfig(train=folders.train, validation=folders.validation), seed=0)
    assert [r.spatial_shape for r in train] == [(8, 32, 32)] * 2 and len(validation) == 1


@pytest.mark.parametrize(
    ("layers", "annotations", "message"),
    [
        ([ImageLayer("raw", stack(3), "SYX")], np.zeros((3, 32, 32), np.int32), "no painted nuclei"),
        ([ImageLayer("raw", stack(3), "YX")], painted(3, [0]), "layer 'raw' has 3 dimensions (3, 32, 32) but axes 'YX' has 2"),
        ([ImageLayer("raw", stack(3), "SYX")], painted(4, [0]), "the annotation layer's shape (4, 32, 32) matches no chosen image layer"),
        ([ImageLayer("raw", stack(3), "SYX")], painted(3, [0]).astype(np.float32), "instance labels must be integers"),
        ([], None, "choose at least one image layer"),
    ],
)
def test_mistakes_are_one_line_errors(tmp_path, layers, annotations, message):
    with pytest.raises(DataError, match=None) as error:
        write_training_data(tmp_path / "data", layers, annotations)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "data").exists()


def test_axes_and_patch_size_parsing():
    assert [default_axes(n) for n in (2, 3, 4)] == ["YX", "SYX", "SZYX"]
    assert parse_patch_size("64", 2) == [64, 64] and parse_patch_size("16,64,64", 3) == [16, 64, 64]
    with pytest.raises(DataError, match="has 2 entries but the images are 3-D"):
        parse_patch_size("32,32", 3)


def test_tiled_layer_prediction_reports_progress_and_equals_denoiseg_predict(tmp_path, capsys):
    from denoiseg_core.checkpoint import load_checkpoint
    from denoiseg_core.evaluation import segment
    from denoiseg_core.prediction import predict_image
    from denoiseg_napari.predictor import RunPredictor, predict_layer, relabel
    from denoiseg_napari.sample_data import noisy_nuclei_stack
    from denoiseg_napari.training_run import TrainingCallbacks, TrainingRequest, run_training

    noisy, annotations = noisy_nuclei_stack()
    request = TrainingRequest(
        run_dir=tmp_path / "run", epochs=1, steps_per_epoch=2, batch_size=4, patch_size=[32, 32],
        extra_overrides=["model.backbone.params.depth=2", "model.backbone.params.first_filters=8"],
    )
    outcome = run_training(request, [ImageLayer("noisy", noisy, "SYX")], annotations, resume=False, callbacks=TrainingCallbacks(), stop=threading.Event())
    assert outcome.finished

    predictor = RunPredictor(tmp_path / "run", tile=(64, 64))
    layer = noisy[:2, :100, :120]
    reports: list[tuple[int, int]] = []
    result = predict_layer(predictor, "noisy", layer, "SYX", lambda done, total: reports.append((done, total)))
    total = reports[-1][1]
    assert total == 2 * predictor.tiles((100, 120)) > 2  # several tiles per image
    assert reports[0] == (0, total) and reports[-1] == (total, total)
    assert [done for done, _ in reports] == sorted(done for done, _ in reports)

    model = load_checkpoint(tmp_path / "run" / "best.pt")
    for index in range(2):
        expected = predict_image(model, layer[index][None], tile=(64, 64), precision="auto")
        np.testing.assert_allclose(result.denoised[index], expected.denoised[0], rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(result.probabilities[:, index], expected.probabilities, atol=1e-4)
        np.testing.assert_array_equal(result.labels[index], segment(model, expected))
    assert result.probabilities.shape == (3, *layer.shape) and result.labels.shape == layer.shape
    np.testing.assert_array_equal(relabel(predictor, result.probabilities, "SYX", predictor.threshold), result.labels)

    # The widget's run folder is the CLI's: `denoiseg train --resume` continues it.
    from cli_helpers import run_cli

    code, out, err = run_cli(["train", "--resume", str(tmp_path / "run"), "--set", "training.epochs=2", "--no-progress"], capsys)
    assert code == 0, err
    assert "resuming" in out and len((tmp_path / "run" / "log.csv").read_text().strip().splitlines()) == 3

    # epoch 2 was the denoising finish: best_denoising.pt now differs from best.pt, and the run folder
    # denoises with it (as `denoiseg predict RUN_FOLDER`) while best.pt still segments
    segmenter, denoiser = (load_checkpoint(tmp_path / "run" / name) for name in ("best.pt", "best_denoising.pt"))
    predictor = RunPredictor(tmp_path / "run", tile=(64, 64))
    assert predictor.tiles((100, 120)) == 2 * RunPredictor(tmp_path / "run" / "best.pt", tile=(64, 64)).tiles((100, 120))
    result = predict_layer(predictor, "noisy", layer[:1], "SYX", lambda done, total: None)
    by_segmenter = predict_image(segmenter, layer[0][None], tile=(64, 64), precision="auto")
    by_denoiser = predict_image(denoiser, layer[0][None], tile=(64, 64), precision="auto")
    assert np.abs(by_segmenter.denoised - by_denoiser.denoised).max() > 1e-2
    np.testing.assert_allclose(result.denoised[0], by_denoiser.denoised[0], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(result.probabilities[:, 0], by_segmenter.probabilities, atol=1e-4)


def test_recipes_config_file_and_overrides(tmp_path):
    from denoiseg_napari.training_run import TrainingRequest, build_config

    folders = write_training_data(tmp_path / "data", [ImageLayer("raw", stack(3), "SYX")], painted(3, [0, 1]))
    config_file = tmp_path / "my.yaml"
    config_file.write_text(
        "seed: 7\ndata: {patch_size: [32, 32]}\n"
        "model: {backbone: {name: unet, params: {depth: 2, first_filters: 8}}}\ntraining: {epochs: 5, alpha: 0.3}\n"
    )
    run_dir = tmp_path / "run"
    config = build_config(TrainingRequest(run_dir=run_dir, recipe="file", config_file=config_file), folders)
    assert (config.seed, config.data.patch_size, config.training.epochs, config.training.alpha) == (7, [32, 32], 5, 0.3)
    assert config.model.backbone.params == {"depth": 2, "first_filters": 8}
    assert (config.run_dir, config.data.train, config.data.validation) == (run_dir, folders.train, None)
    # the widget's overrides win; another backbone starts from its own defaults
    config = build_config(
        TrainingRequest(run_dir=run_dir, recipe="file", config_file=config_file, epochs=3, patch_size=[48, 48], backbone="res_unet"),
        folders,
    )
    assert (config.training.epochs, config.data.patch_size) == (3, [48, 48])
    assert (config.model.backbone.name, config.model.backbone.params) == ("res_unet", {})
    default = build_config(TrainingRequest(run_dir=run_dir, recipe="default"), folders)
    quick = build_config(TrainingRequest(run_dir=run_dir, recipe="quick"), folders)
    assert (default.training.epochs, default.model.backbone.params) == (200, {})
    assert (quick.training.epochs, quick.model.backbone.params) == (12, {"depth": 3, "first_filters": 16})
    from denoiseg_core.errors import DenoiSegError

    with pytest.raises(DenoiSegError, match="choose a config file"):
        build_config(TrainingRequest(run_dir=run_dir, recipe="file"), folders)


def test_a_partly_painted_volume_trains(tmp_path):
    """3-D through the widget's training code: a synthetic volume painted in a few z slices."""
    from denoiseg_core.synthetic import make_nuclei_image
    from denoiseg_napari.training_run import TrainingCallbacks, TrainingRequest, run_training

    _, noisy, labels = make_nuclei_image((16, 48, 48), np.random.default_rng(0))
    painted_slices = np.zeros_like(labels)
    painted_slices[4:9] = labels[4:9]
    epochs: list[dict] = []
    request = TrainingRequest(
        run_dir=tmp_path / "run", epochs=1, steps_per_epoch=2, batch_size=2, patch_size=[8, 32, 32],
        extra_overrides=["model.backbone.params.depth=2", "model.backbone.params.first_filters=4"],
    )
    outcome = run_training(
        request, [ImageLayer("volume", noisy, "ZYX")], painted_slices, resume=False,
        callbacks=TrainingCallbacks(epoch=epochs.append), stop=threading.Event(),
    )
    assert outcome.finished and [e["epoch"] for e in epochs] == [1]
    assert (tmp_path / "run" / "best.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "napari_data" / "train" / "masks").iterdir()) == ["volume_0000_z0004-0008.tif"]
