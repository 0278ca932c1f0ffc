"""The napari plugin in a real (headless) viewer: manifest, widgets, train/stop/continue,
predict and threshold, correct and retrain, export, sample data and one-line errors.

Needs the ``napari`` extra and a display (pytest-xvfb starts Xvfb when it is installed).
Outside CI the tests are skipped where napari or a display is genuinely missing; in CI
(``CI=true``) they must run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

if os.environ.get("CI") != "true":
    pytest.importorskip("napari")
    pytest.importorskip("pytestqt")
    if not os.environ.get("DISPLAY"):
        pytest.skip("no display for the viewer (install Xvfb: pytest-xvfb starts it)", allow_module_level=True)

import napari  # noqa: E402
from napari.utils.notifications import notification_manager  # noqa: E402

from denoiseg_napari.sample_data import SAMPLE_IMAGES, SAMPLE_PAINTED, SAMPLE_SHAPE  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
#: ``DENOISEG_UPDATE_SCREENSHOT=1`` also writes the screenshot the README shows
README_SCREENSHOT = REPOSITORY / "docs" / "napari_widgets.png"
#: worker waits (ms): generous for 2 busy cores
TRAINING_TIMEOUT = 120_000
#: a tiny model and schedule: seconds per run on one CPU core; the README's screenshot gets a
#: model trained long enough to find the nuclei (about a minute)
UPDATE_SCREENSHOT = os.environ.get("DENOISEG_UPDATE_SCREENSHOT") == "1"
TINY = {"epochs": 2, "steps": 3, "batch": 4, "patch": "32"}
if UPDATE_SCREENSHOT:
    TINY = {"epochs": 10, "steps": 30, "batch": 16, "patch": "64"}


@pytest.fixture
def viewer_with_sample(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("denoiseg", "noisy_nuclei")
    return viewer


@pytest.fixture
def notifications():
    """Messages shown in napari's notification area during the test."""
    seen: list = []
    notification_manager.notification_ready.connect(seen.append)
    yield seen
    notification_manager.notification_ready.disconnect(seen.append)


def dock(viewer, name: str):
    _, widget = viewer.window.add_plugin_dock_widget("denoiseg", name)
    return widget


def configure_tiny(train, run_dir: Path) -> None:
    train.epochs.setValue(TINY["epochs"])
    train.steps.setValue(TINY["steps"])
    train.batch.setValue(TINY["batch"])
    train.patch.setText(TINY["patch"])
    train.run_dir.setText(str(run_dir))


def wait_for_training(qtbot, train) -> None:
    qtbot.waitUntil(lambda: train.outcome is not None and train.train_button.isEnabled(), timeout=TRAINING_TIMEOUT)


def wait_for_prediction(qtbot, predict, layer_name: str) -> None:
    """Until the layer is there and the worker has finished (Predict is enabled again)."""
    qtbot.waitUntil(lambda: layer_name in predict.viewer.layers and predict.predict_button.isEnabled(), timeout=TRAINING_TIMEOUT)


def log_rows(run_dir: Path) -> int:
    return len((run_dir / "log.csv").read_text().strip().splitlines()) - 1


def test_manifest_validates():
    npe2 = Path(sys.executable).parent / "npe2"
    result = subprocess.run([str(npe2), "validate", "denoiseg"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_sample_data_and_widgets_open_in_a_viewer(viewer_with_sample):
    viewer = viewer_with_sample
    image, annotations = viewer.layers["noisy nuclei"], viewer.layers["annotations"]
    assert image.data.shape == annotations.data.shape == (SAMPLE_IMAGES, *SAMPLE_SHAPE)
    painted = [bool(annotations.data[i].any()) for i in range(SAMPLE_IMAGES)]
    assert painted == [True] * SAMPLE_PAINTED + [False] * (SAMPLE_IMAGES - SAMPLE_PAINTED)
    train, predict, export = (dock(viewer, name) for name in ("Train", "Predict", "Export"))
    assert train.selected_image_names() == ["noisy nuclei"]
    assert train.axes.currentText() == "SYX"
    assert train.annotations.currentText() == "annotations"
    assert predict.layer.currentText() == "noisy nuclei"
    assert export.mask.findText("annotations") >= 0
    # new layers show up in the choices; renamed ones stay chosen
    viewer.add_labels(np.zeros((SAMPLE_IMAGES, *SAMPLE_SHAPE), np.int32), name="more labels")
    assert train.annotations.findText("more labels") >= 0
    annotations.name = "painted nuclei"
    image.name = "raw"
    assert train.annotations.currentText() == "painted nuclei" and train.annotations.layer() is annotations
    assert train.selected_image_names() == ["raw"] and predict.layer.layer() is image
    # closing a widget does not break the other widgets or later layer events
    viewer.window.remove_dock_widget(export.parent())
    viewer.add_image(np.zeros((4, 4)), name="after closing")
    assert predict.layer.findText("after closing") >= 0


def test_user_mistakes_show_one_line_in_the_notification_area(viewer_with_sample, qtbot, tmp_path, notifications):
    viewer = viewer_with_sample
    train = dock(viewer, "Train")
    configure_tiny(train, tmp_path / "run")
    viewer.layers["annotations"].data = np.zeros_like(viewer.layers["annotations"].data)  # nothing painted
    train.train_button.click()
    qtbot.waitUntil(lambda: train.train_button.isEnabled() and bool(notifications), timeout=TRAINING_TIMEOUT)
    messages = [str(n.message) for n in notifications]
    assert messages == ["error: no painted nuclei: paint every nucleus of at least one image (or slice) in the annotation layer"]
    assert all(n.severity == "error" and "\n" not in str(n.message) for n in notifications)
    assert not (tmp_path / "run" / "last.pt").exists()

    predict = dock(viewer, "Predict")
    predict.source.setText(str(tmp_path / "missing"))
    predict.predict_button.click()
    qtbot.waitUntil(lambda: len(notifications) == 2, timeout=TRAINING_TIMEOUT)
    assert str(notifications[1].message) == f"error: {tmp_path / 'missing'}: not found (choose a run folder, a .pt checkpoint or a bioimage.io .zip)"


def test_train_stop_continue_predict_threshold_correct_retrain(viewer_with_sample, qtbot, tmp_path):
    viewer = viewer_with_sample
    train = dock(viewer, "Train")
    predict = dock(viewer, "Predict")
    run_dir = tmp_path / "run"
    configure_tiny(train, run_dir)

    # Train, and press Stop as soon as the first epoch is reported. Step reports reach the
    # main thread's event loop while the worker runs: the viewer stays responsive.
    steps_seen_while_running: list[bool] = []
    train.signals.step.connect(lambda *_: steps_seen_while_running.append(train.worker.is_running))
    train.signals.epoch.connect(lambda values: values["epoch"] == 1 and train.stop_button.click())
    train.train_button.click()
    assert train.stop_button.isEnabled() and not train.train_button.isEnabled()
    wait_for_training(qtbot, train)
    assert not train.outcome.finished and train.outcome.epochs_done == 1
    assert any(steps_seen_while_running)
    assert log_rows(run_dir) == 1 and (run_dir / "last.pt").is_file()
    assert sorted(p.name for p in (run_dir / "napari_data" / "train" / "masks").iterdir()) == [
        f"noisy_nuclei_{i:04d}.tif" for i in range(SAMPLE_PAINTED)
    ]

    # Continue: resumes from last.pt up to the planned epochs; the curves hold every epoch.
    train.outcome = None
    train.continue_button.click()
    wait_for_training(qtbot, train)
    assert train.outcome.finished and train.outcome.epochs_done == TINY["epochs"]
    assert log_rows(run_dir) == TINY["epochs"]
    assert [h["epoch"] for h in train.history] == list(range(1, TINY["epochs"] + 1))
    assert train.progress.value() == train.progress.maximum() == TINY["epochs"] * TINY["steps"]
    assert len(train.figure.axes[0].lines[0].get_xdata()) == TINY["epochs"]

    # Predict: three layers with the image's shapes.
    assert predict.source.text() == str(run_dir)  # the run just trained
    predict.with_probabilities.setChecked(True)
    predict.predict_button.click()
    wait_for_prediction(qtbot, predict, "noisy nuclei labels")
    shape = (SAMPLE_IMAGES, *SAMPLE_SHAPE)
    assert viewer.layers["noisy nuclei denoised"].data.shape == shape
    assert viewer.layers["noisy nuclei probabilities"].data.shape == (3, *shape)
    labels_layer = viewer.layers["noisy nuclei labels"]
    assert isinstance(labels_layer, napari.layers.Labels) and labels_layer.data.shape == shape
    # one tile per 128x128 image and network: best.pt segments, best_denoising.pt denoises
    assert predict.progress.value() == predict.progress.maximum() == 2 * SAMPLE_IMAGES
    probabilities = viewer.layers["noisy nuclei probabilities"].data
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-3)

    # The threshold slider recomputes the instances from the stored probabilities.
    predict.threshold.setValue(1)
    low = labels_layer.data.copy()
    predict.threshold.setValue(99)
    high = labels_layer.data.copy()
    from denoiseg_core.checkpoint import load_checkpoint

    model = load_checkpoint(run_dir / "best.pt")  # what `denoiseg predict --threshold` would use
    for threshold, labels in ((0.01, low), (0.99, high)):
        settings = model.instance_settings.with_threshold(threshold)
        expected = np.stack([model.head.instances(probabilities[:, i], settings) for i in range(SAMPLE_IMAGES)])
        np.testing.assert_array_equal(labels, expected)
    assert (high > 0).sum() < (low > 0).sum()
    assert predict.threshold_label.text() == "threshold 0.99"
    predict.threshold.setValue(50)

    # A screenshot with the widgets docked, showing an image nobody painted.
    stack_axis = viewer.dims.ndim - 3  # the probabilities layer adds the class axis in front
    viewer.dims.set_current_step(stack_axis, SAMPLE_PAINTED)
    viewer.window.resize(1500, 1000)
    viewer.reset_view()
    screenshot = viewer.screenshot(canvas_only=False)
    assert screenshot.ndim == 3 and screenshot.shape[0] > 300 and screenshot.std() > 10
    from skimage.io import imsave

    imsave(tmp_path / "napari_widgets.png", screenshot, check_contrast=False)
    if UPDATE_SCREENSHOT:
        README_SCREENSHOT.parent.mkdir(exist_ok=True)
        imsave(README_SCREENSHOT, screenshot, check_contrast=False)

    # Correct and retrain: copy the labels of the unpainted image on screen into the
    # annotations, "correct" them (erase one nucleus), continue from the current weights.
    predict.threshold.setValue(1)  # even a barely trained model has some pixels above 0.01
    annotations = viewer.layers["annotations"]
    predict.annotations.setCurrentText("annotations")
    predict.copy_button.click()
    copied = annotations.data[SAMPLE_PAINTED].copy()
    assert copied.any()
    np.testing.assert_array_equal(copied, labels_layer.data[SAMPLE_PAINTED])
    assert not annotations.data[SAMPLE_PAINTED + 1].any()  # other images stay unpainted
    corrected = annotations.data.copy()
    corrected[SAMPLE_PAINTED][corrected[SAMPLE_PAINTED] == copied.max()] = 0
    if not corrected[SAMPLE_PAINTED].any():  # one big blob: paint one nucleus by hand instead
        corrected[SAMPLE_PAINTED, 10:20, 10:20] = 1
    annotations.data = corrected
    train.epochs.setValue(1)
    train.outcome = None
    train.continue_button.click()
    wait_for_training(qtbot, train)
    assert train.outcome.finished and train.outcome.epochs_done == TINY["epochs"] + 1
    assert log_rows(run_dir) == TINY["epochs"] + 1
    masks = run_dir / "napari_data" / "train" / "masks"
    assert len(list(masks.iterdir())) == SAMPLE_PAINTED + 1  # the corrected image is now labelled
    written = tifffile.imread(masks / f"noisy_nuclei_{SAMPLE_PAINTED:04d}.tif")
    np.testing.assert_array_equal(written, corrected[SAMPLE_PAINTED])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A finished tiny run trained on the sample data (through the widget's training code)."""
    import threading

    from denoiseg_napari.layer_data import ImageLayer
    from denoiseg_napari.sample_data import noisy_nuclei_stack
    from denoiseg_napari.training_run import TrainingCallbacks, TrainingRequest, run_training

    noisy, annotations = noisy_nuclei_stack()
    run_dir = tmp_path_factory.mktemp("napari") / "run"
    request = TrainingRequest(run_dir=run_dir, epochs=1, steps_per_epoch=3, batch_size=4, patch_size=[32, 32])
    outcome = run_training(
        request, [ImageLayer("noisy", noisy, "SYX")], annotations, resume=False, callbacks=TrainingCallbacks(), stop=threading.Event()
    )
    assert outcome.finished
    return run_dir


def test_export_from_the_widget_passes_bioimageio_test(viewer_with_sample, qtbot, tiny_run, tmp_path):
    viewer = viewer_with_sample
    export = dock(viewer, "Export")
    package = tmp_path / "model.zip"
    export.source.setText(str(tiny_run))
    export.out.setText(str(package))
    export.name.setText("DenoiSeg napari test")
    export.authors.setText("Ada Lovelace, Grace Hopper")
    export.sample.setCurrentText("noisy nuclei")
    export.mask.setCurrentText("annotations")
    viewer.dims.set_current_step(0, 1)  # a painted image: its scores go into the README
    export.export_button.click()
    qtbot.waitUntil(lambda: export.result is not None, timeout=300_000)
    assert export.result.summary.status == "passed"
    assert package.is_file()
    text = export.result_text.toPlainText()
    assert "status: passed" in text and f"package written and tested: {package}" in text

    from denoiseg_zoo.runtime import test_package

    assert test_package(package).status == "passed"  # the real bioimageio.core test, on the written file

    # The package predicts in the viewer too (through bioimageio.core), with the same three layers.
    predict = dock(viewer, "Predict")
    predict.source.setText(str(package))
    predict.predict_button.click()
    wait_for_prediction(qtbot, predict, "noisy nuclei labels")
    assert viewer.layers["noisy nuclei denoised"].data.shape == viewer.layers["noisy nuclei labels"].data.shape == (SAMPLE_IMAGES, *SAMPLE_SHAPE)

    # Any package with one input: its outputs come in as they are (here: ours without its
    # denoiseg section, so the viewer knows nothing about its channels).
    import zipfile

    import yaml

    generic = tmp_path / "generic.zip"
    with zipfile.ZipFile(package) as source, zipfile.ZipFile(generic, "w") as out:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "rdf.yaml":
                rdf = yaml.safe_load(data)
                del rdf["config"]["denoiseg"]
                data = yaml.safe_dump(rdf).encode()
            out.writestr(item.filename, data)
    predict.source.setText(str(generic))
    predict.predict_button.click()
    wait_for_prediction(qtbot, predict, "noisy nuclei output")
    assert viewer.layers["noisy nuclei output"].data.shape == (SAMPLE_IMAGES, 4, *SAMPLE_SHAPE)
    assert predict.status.text() == "done (this package gives no instance labels)"
