"""The dock widgets: Train, Predict (with the threshold slider and "copy to annotations") and Export.

Long work runs in napari worker threads, so the viewer stays responsive. A user's mistake
(:class:`~denoiseg_core.errors.DenoiSegError`) is caught inside the worker and shown in
napari's notification area as the one line the CLI prints (``error: ...``); napari would
otherwise show every worker exception with its traceback, which is kept for real bugs.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from napari.layers import Image, Labels
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from denoiseg_core.errors import DenoiSegError

from denoiseg_napari.layer_data import AXES_CHOICES, ImageLayer, default_axes, parse_patch_size, spatial_ndim

if TYPE_CHECKING:
    import napari

#: the run trained most recently in this session: Predict and Export start from it
_recent_run: dict[str, Path] = {}


class _RecentRun(QObject):
    """Tells open Predict and Export widgets that a training run finished or stopped."""

    changed = Signal(object)


_recent_run_signal: _RecentRun | None = None


def recent_run_signal() -> _RecentRun:
    global _recent_run_signal
    if _recent_run_signal is None:  # created lazily: a QObject needs the QApplication first
        _recent_run_signal = _RecentRun()
    return _recent_run_signal


def _follow_recent_run(edit: QLineEdit, make_text: Callable[[Path], str] = str) -> None:
    """Fill ``edit`` with each new run unless the user typed something else there."""

    signal = recent_run_signal().changed

    def update(run_dir: Path) -> None:
        previous = _recent_run.get("previous")
        try:
            if not edit.text().strip() or (previous is not None and edit.text() == make_text(previous)):
                edit.setText(make_text(run_dir))
        except RuntimeError:  # the widget was closed (Qt deleted the line edit)
            signal.disconnect(update)

    signal.connect(update)


@dataclass
class UserFailure:
    """A worker's DenoiSegError, carried back to the main thread as a result."""

    message: str


def _catching_user_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except DenoiSegError as exc:
            return UserFailure(f"error: {exc}")

    return run


def notify_user_error(message: str) -> None:
    """The CLI's one-line message in napari's notification area (no traceback)."""
    show_error(message)


def _run_in_thread(function: Callable[..., Any], *args, on_done: Callable[[Any], None], on_finished: Callable[[], None], **kwargs):
    worker = create_worker(_catching_user_errors(function), *args, _start_thread=False, **kwargs)

    def returned(value: Any) -> None:
        if isinstance(value, UserFailure):
            notify_user_error(value.message)
        else:
            on_done(value)

    worker.returned.connect(returned)
    worker.finished.connect(on_finished)
    worker.start()
    return worker


def follow_layer_list(viewer: napari.Viewer, widget: QWidget, refresh: Callable[[], None]) -> None:
    """Call ``refresh`` when layers are added, removed, reordered or renamed, for as long as
    ``widget`` lives (a closed dock widget must not receive the viewer's later events)."""
    events = viewer.layers.events
    renames: set[int] = set()

    def on_change(*_event) -> None:
        try:
            for layer in viewer.layers:
                if id(layer) not in renames:
                    renames.add(id(layer))
                    layer.events.name.connect(on_change)
            refresh()
        except RuntimeError:  # Qt deleted the widget: stop listening
            for event in (events.inserted, events.removed, events.reordered):
                event.disconnect(on_change)
            for layer in viewer.layers:
                layer.events.name.disconnect(on_change)

    for event in (events.inserted, events.removed, events.reordered):
        event.connect(on_change)
    on_change()


class LayerChoice(QComboBox):
    """The viewer's layers of one type, kept up to date (optionally with a 'none' entry)."""

    def __init__(self, viewer: napari.Viewer, kind: type, optional: bool = False):
        super().__init__()
        self.viewer, self.kind, self.optional = viewer, kind, optional
        follow_layer_list(viewer, self, self.refresh)

    def refresh(self, *_event) -> None:
        current = self.layer()  # kept by identity, so a renamed layer stays selected
        self.blockSignals(True)
        self.clear()
        if self.optional:
            self.addItem("none", None)
        for layer in self.viewer.layers:
            if isinstance(layer, self.kind):
                self.addItem(layer.name, layer)
                if layer is current:
                    self.setCurrentIndex(self.count() - 1)
        self.blockSignals(False)
        self.currentTextChanged.emit(self.currentText())

    def layer(self):
        """The chosen layer (None for 'none', or when it has left the viewer)."""
        layer = self.currentData()
        return layer if layer is not None and layer in self.viewer.layers else None


def _axes_box() -> QComboBox:
    box = QComboBox()
    box.addItems(AXES_CHOICES)
    box.setToolTip("S: a stack of separate images; Z: the depth of a 3-D image")
    return box


def _path_row(edit: QLineEdit, directory: bool, save: bool = False, filter_: str = "") -> QWidget:
    row = QWidget()
    layout = QHBoxLayout(row)
    layout.setContentsMargins(0, 0, 0, 0)
    layout.addWidget(edit)
    button = QPushButton("...")
    button.setMaximumWidth(30)

    def browse() -> None:
        if directory:
            chosen = QFileDialog.getExistingDirectory(row, "Choose a folder", edit.text())
        elif save:
            chosen, _ = QFileDialog.getSaveFileName(row, "Save as", edit.text(), filter_)
        else:
            chosen, _ = QFileDialog.getOpenFileName(row, "Choose a file", edit.text(), filter_)
        if chosen:
            edit.setText(chosen)

    button.clicked.connect(browse)
    layout.addWidget(button)
    return row


def _image_data(layer, what: str) -> np.ndarray:
    if getattr(layer, "rgb", False):
        raise DenoiSegError(f"layer {layer.name!r} is RGB; DenoiSeg works on single-channel images")
    if getattr(layer, "multiscale", False):
        raise DenoiSegError(f"layer {layer.name!r} is multiscale; open a single-resolution image for {what}")
    return np.array(layer.data)  # a copy: the user may keep painting while the worker reads it


class _TrainingSignals(QObject):
    """Carries the trainer's callbacks from the worker thread into the main thread."""

    step = Signal(int, int, float)
    epoch = Signal(object)
    message = Signal(str)


class TrainWidget(QWidget):
    """Pick image layers and an annotation layer, a recipe and a few overrides; Train / Stop / Continue."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        from denoiseg_core.plugin_manager import get_registry

        from denoiseg_napari.training_run import RECIPES

        self.viewer = napari_viewer
        self.images = QListWidget()
        self.images.setMaximumHeight(90)
        self.images.setToolTip("image layers to train on (all are denoised; the annotated one is also segmented)")
        self.axes = _axes_box()
        self.annotations = LayerChoice(napari_viewer, Labels)
        self.annotations.setToolTip("paint every nucleus of an image (slice); unpainted images (slices) are unlabelled")
        self.recipe = QComboBox()
        self.recipe.addItems([*RECIPES, "config file"])
        self.recipe.setToolTip("quick: the demo's small U-Net and short schedule; default: denoiseg's defaults (the paper's)")
        self.config_file = QLineEdit()
        self.epochs = QSpinBox(minimum=0, maximum=100000, value=0, specialValueText="recipe's")
        self.epochs.setToolTip("epochs to train; Continue on a finished run trains this many more")
        self.steps = QSpinBox(minimum=0, maximum=100000, value=0, specialValueText="recipe's")
        self.batch = QSpinBox(minimum=0, maximum=4096, value=0, specialValueText="recipe's")
        self.patch = QLineEdit("64")
        self.patch.setToolTip("patch edge (64) or one per axis (16,64,64); empty: the recipe's")
        self.backbone = QComboBox()
        self.backbone.addItems(["recipe's", *get_registry().names("backbone")])
        self.run_dir = QLineEdit(str(Path.home() / "denoiseg-runs" / time.strftime("run-%Y%m%d-%H%M%S")))
        self.train_button, self.stop_button, self.continue_button = QPushButton("Train"), QPushButton("Stop"), QPushButton("Continue")
        self.stop_button.setEnabled(False)
        self.progress = QProgressBar()
        self.status = QLabel("")
        self.status.setWordWrap(True)

        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.2, 2.4), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(200)
        self.history: list[dict] = []

        form = QFormLayout()
        form.addRow("image layers", self.images)
        form.addRow("axes", self.axes)
        form.addRow("annotations", self.annotations)
        form.addRow("recipe", self.recipe)
        form.addRow("config file", _path_row(self.config_file, directory=False, filter_="YAML (*.yaml *.yml)"))
        form.addRow("epochs", self.epochs)
        form.addRow("steps per epoch", self.steps)
        form.addRow("batch size", self.batch)
        form.addRow("patch size", self.patch)
        form.addRow("backbone", self.backbone)
        form.addRow("run folder", _path_row(self.run_dir, directory=True))
        buttons = QHBoxLayout()
        for button in (self.train_button, self.stop_button, self.continue_button):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addWidget(self.canvas)
        layout.addStretch()

        self.signals = _TrainingSignals()
        self.signals.step.connect(self._on_step)
        self.signals.epoch.connect(self._on_epoch)
        self.signals.message.connect(self.status.setText)
        self.stop_event = threading.Event()
        self.destroyed.connect(self.stop_event.set)  # closing the widget stops its training at the next step
        self.worker = None
        self.outcome = None
        self.train_button.clicked.connect(lambda: self.start(resume=False))
        self.continue_button.clicked.connect(lambda: self.start(resume=True))
        self.stop_button.clicked.connect(self.stop)
        self.axes.currentTextChanged.connect(self._default_patch)
        self.recipe.currentTextChanged.connect(self._default_patch)
        follow_layer_list(napari_viewer, self, self._refresh_images)
        self._draw_curves()

    # ---------------------------------------------------------------- layers
    def _refresh_images(self, *_event) -> None:
        checked = [id(layer) for layer in self.selected_image_layers()]
        self.images.clear()
        for layer in self.viewer.layers:
            if isinstance(layer, Image):
                item = QListWidgetItem(layer.name)
                item.setData(Qt.UserRole, layer)
                item.setFlags(item.flags() | Qt.ItemIsUserCheckable)
                item.setCheckState(Qt.Checked if (id(layer) in checked or not checked) else Qt.Unchecked)
                self.images.addItem(item)
        first = next((layer for layer in self.viewer.layers if isinstance(layer, Image)), None)
        if first is not None and not checked:
            self.axes.setCurrentText(default_axes(first.ndim))

    def _default_patch(self, *_args) -> None:
        """Keep the default patch size fitting 2-D or 3-D images, and a config file's own
        (empty field); a size the user typed stays."""
        defaults = {2: "64", 3: "16,64,64"}
        if self.patch.text().strip() in (*defaults.values(), ""):
            from_file = self.recipe.currentText() == "config file"
            self.patch.setText("" if from_file else defaults[spatial_ndim(self.axes.currentText())])

    def selected_image_layers(self) -> list:
        items = (self.images.item(i) for i in range(self.images.count()))
        layers = [item.data(Qt.UserRole) for item in items if item.checkState() == Qt.Checked]
        return [layer for layer in layers if layer in self.viewer.layers]

    def selected_image_names(self) -> list[str]:
        return [layer.name for layer in self.selected_image_layers()]

    # ---------------------------------------------------------------- training
    def request(self):
        from denoiseg_napari.training_run import TrainingRequest

        recipe = self.recipe.currentText()
        axes = self.axes.currentText()
        return TrainingRequest(
            run_dir=Path(self.run_dir.text()).expanduser(),
            recipe="file" if recipe == "config file" else recipe,
            config_file=Path(self.config_file.text()).expanduser() if self.config_file.text().strip() else None,
            epochs=self.epochs.value() or None,
            steps_per_epoch=self.steps.value() or None,
            batch_size=self.batch.value() or None,
            patch_size=parse_patch_size(self.patch.text(), spatial_ndim(axes)) if self.patch.text().strip() else None,
            backbone=None if self.backbone.currentText() == "recipe's" else self.backbone.currentText(),
        )

    def start(self, resume: bool) -> None:
        """Train a new run, or continue the run folder's run with the current annotations."""
        from denoiseg_napari.training_run import TrainingCallbacks, run_training

        try:
            chosen = self.selected_image_layers()
            if not chosen:
                raise DenoiSegError("choose at least one image layer to train on")
            axes = self.axes.currentText()
            layers = [ImageLayer(layer.name, _image_data(layer, "training"), axes) for layer in chosen]
            annotation_layer = self.annotations.layer()
            if annotation_layer is None:
                raise DenoiSegError("choose a Labels layer with painted nuclei (or add one: Layers > New Labels layer)")
            annotations = np.array(annotation_layer.data)
            request = self.request()
        except DenoiSegError as exc:
            notify_user_error(f"error: {exc}")
            return
        if not resume:
            self.history = []
            self._draw_curves()
        self.stop_event.clear()
        callbacks = TrainingCallbacks(
            step=self.signals.step.emit, epoch=self.signals.epoch.emit, message=self.signals.message.emit
        )
        self._set_running(True)
        self.status.setText("preparing the data and the model...")
        self.worker = _run_in_thread(
            run_training,
            request,
            layers,
            annotations,
            resume=resume,
            callbacks=callbacks,
            stop=self.stop_event,
            on_done=self._on_done,
            on_finished=lambda: self._set_running(False),
        )

    def stop(self) -> None:
        """Stop at the next step; the run keeps its last finished epoch (Continue resumes it)."""
        self.stop_event.set()
        self.status.setText("stopping after the current step...")

    def _set_running(self, running: bool) -> None:
        self.train_button.setEnabled(not running)
        self.continue_button.setEnabled(not running)
        self.stop_button.setEnabled(running)

    def _on_step(self, done: int, total: int, loss: float) -> None:
        self.progress.setMaximum(total)
        self.progress.setValue(done)
        self.progress.setFormat(f"%v/%m steps  loss {loss:.4f}")

    def _on_epoch(self, values: dict) -> None:
        self.history = [h for h in self.history if h["epoch"] < values["epoch"]] + [values]
        self._draw_curves()
        self.status.setText(
            f"epoch {int(values['epoch'])}: train loss {values['train_loss']:.4f}, "
            f"validation loss {values['val_loss']:.4f}, validation AP@0.5 {values['val_ap50']:.3f}"
        )

    def _draw_curves(self) -> None:
        self.figure.clear()
        loss_axes = self.figure.add_subplot(111)
        epochs = [h["epoch"] for h in self.history]
        loss_axes.plot(epochs, [h["train_loss"] for h in self.history], "o-", label="train loss", markersize=3)
        loss_axes.plot(epochs, [h["val_loss"] for h in self.history], "o-", label="val loss", markersize=3)
        loss_axes.set_xlabel("epoch")
        loss_axes.set_ylabel("loss")
        ap_axes = loss_axes.twinx()
        ap_axes.plot(epochs, [h["val_ap50"] for h in self.history], "s--", color="tab:green", label="AP@0.5", markersize=3)
        if any("val_ap50_tuned" in h for h in self.history):  # AP at each epoch's best threshold
            tuned = [h.get("val_ap50_tuned", float("nan")) for h in self.history]
            ap_axes.plot(epochs, tuned, "^:", color="tab:olive", label="AP@0.5, best threshold", markersize=3)
        ap_axes.set_ylim(0, 1)
        ap_axes.set_ylabel("AP@0.5")
        handles = loss_axes.get_legend_handles_labels()[0] + ap_axes.get_legend_handles_labels()[0]
        loss_axes.legend(handles, [h.get_label() for h in handles], fontsize="xx-small", loc="center right", framealpha=0.6)
        self.canvas.draw_idle()

    def _on_done(self, outcome) -> None:
        self.outcome = outcome
        if "run" in _recent_run:
            _recent_run["previous"] = _recent_run["run"]
        _recent_run["run"] = outcome.run_dir
        recent_run_signal().changed.emit(outcome.run_dir)
        if outcome.finished:
            tuned = f", {outcome.instance_settings.describe()}" if outcome.instance_settings is not None else ""
            self.status.setText(f"finished {outcome.epochs_done} epochs{tuned}: {outcome.run_dir}")
            show_info(f"DenoiSeg training finished: {outcome.run_dir}")
        else:
            self.status.setText(f"stopped; {outcome.epochs_done} epochs saved in {outcome.run_dir} (Continue resumes)")


class _ProgressSignal(QObject):
    changed = Signal(int, int)


class PredictWidget(QWidget):
    """A run or package on a layer: denoised, probabilities and labels layers; live threshold."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.source = QLineEdit(str(_recent_run.get("run", "")))
        self.source.setToolTip("a run folder (best.pt segments, best_denoising.pt denoises), a .pt checkpoint, or a bioimage.io package .zip")
        _follow_recent_run(self.source)
        self.layer = LayerChoice(napari_viewer, Image)
        self.layer.currentTextChanged.connect(self._default_axes)
        self.axes = _axes_box()
        self.with_probabilities = QCheckBox("add a probabilities layer")
        self.predict_button = QPushButton("Predict")
        self.progress = QProgressBar()
        self.threshold = QSlider(Qt.Horizontal)
        self.threshold.setRange(1, 99)
        self.threshold.setEnabled(False)
        self.threshold_label = QLabel("threshold -")
        self.annotations = LayerChoice(napari_viewer, Labels)
        self.copy_button = QPushButton("Copy labels into annotations (current image)")
        self.copy_button.setEnabled(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("model", _path_row(self.source, directory=False, filter_="Models (*.pt *.zip)"))
        form.addRow("layer", self.layer)
        form.addRow("axes", self.axes)
        form.addRow("", self.with_probabilities)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.predict_button)
        layout.addWidget(self.progress)
        threshold_row = QHBoxLayout()
        threshold_row.addWidget(self.threshold_label)
        threshold_row.addWidget(self.threshold)
        layout.addLayout(threshold_row)
        correction = QFormLayout()
        correction.addRow("annotations", self.annotations)
        layout.addLayout(correction)
        layout.addWidget(self.copy_button)
        layout.addWidget(self.status)
        layout.addStretch()

        self.progress_signal = _ProgressSignal()
        self.progress_signal.changed.connect(self._on_progress)
        self.predict_button.clicked.connect(self.predict)
        self.threshold.valueChanged.connect(self._on_threshold)
        self.copy_button.clicked.connect(self.copy_to_annotations)
        self.predictor = None
        self.result = None
        self.result_axes = ""
        self.labels_layer: Labels | None = None
        self.worker = None
        self._default_axes()

    def _default_axes(self, *_args) -> None:
        layer = self.layer.layer()
        if layer is not None:
            self.axes.setCurrentText(default_axes(layer.ndim))

    def predict(self) -> None:
        from denoiseg_napari.predictor import load_predictor, predict_layer

        try:
            layer = self.layer.layer()
            if layer is None:
                raise DenoiSegError("choose an image layer to predict")
            if not self.source.text().strip():
                raise DenoiSegError("choose a model: a run folder, a .pt checkpoint or a bioimage.io .zip")
            data = _image_data(layer, "prediction")
        except DenoiSegError as exc:
            notify_user_error(f"error: {exc}")
            return
        source, name, axes = Path(self.source.text()).expanduser(), layer.name, self.axes.currentText()
        emit = self.progress_signal.changed.emit

        def work():
            predictor = load_predictor(source)
            return predictor, predict_layer(predictor, name, data, axes, emit)

        self.predict_button.setEnabled(False)
        self.status.setText("predicting...")
        self.worker = _run_in_thread(
            work,
            on_done=lambda value: self._show(name, axes, layer.scale, *value),
            on_finished=lambda: self.predict_button.setEnabled(True),
        )

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.setMaximum(max(total, 1))
        self.progress.setValue(done)

    def _put(self, name: str, data: np.ndarray, kind: str, **kwargs):
        """Add a layer, or replace the data of the one of that name (predicting again)."""
        if name in self.viewer.layers and isinstance(self.viewer.layers[name], Labels if kind == "labels" else Image):
            layer = self.viewer.layers[name]
            layer.data = data
            return layer
        add = self.viewer.add_labels if kind == "labels" else self.viewer.add_image
        return add(data, name=name, **kwargs)

    def _show(self, name: str, axes: str, scale, predictor, result) -> None:
        if self.predictor is not None and self.predictor is not predictor and hasattr(self.predictor, "close"):
            self.predictor.close()  # a package's bioimageio.core pipeline holds its weights
        self.predictor, self.result, self.result_axes = predictor, result, axes
        for key, output in result.outputs.items():  # a package not made by denoiseg
            self._put(f"{name} {key}", output, "image")
        if result.denoised is not None:
            self._put(f"{name} denoised", result.denoised, "image", scale=scale)
        if result.probabilities is not None and self.with_probabilities.isChecked():
            # classes first (background, foreground, border): hidden so the labels show over the denoised image
            self._put(f"{name} probabilities", result.probabilities, "image", colormap="magma", visible=False)
        if result.labels is not None:
            self.labels_layer = self._put(f"{name} labels", result.labels, "labels", scale=scale)
            self.threshold.blockSignals(True)
            self.threshold.setValue(round(result.threshold * 100))
            self.threshold.blockSignals(False)
            self.threshold_label.setText(f"threshold {result.threshold:.2f}")
            self.threshold.setEnabled(True)
            self.copy_button.setEnabled(True)
            self.status.setText(self._count_text(result))
        else:
            self.status.setText("done (this package gives no instance labels)")

    def _count_text(self, result) -> str:
        from denoiseg_napari.layer_data import split_images

        counts = [len(np.unique(labels)) - 1 for labels in split_images("labels", result.labels, self.result_axes)]
        where = f"{len(counts)} images" if len(counts) > 1 else "the image"
        return f"{sum(counts)} nuclei in {where} at threshold {result.threshold:.2f}"

    def _on_threshold(self, value: int) -> None:
        """Instances again from the stored probabilities (no network pass)."""
        from denoiseg_napari.predictor import relabel

        if self.result is None or self.result.probabilities is None or self.labels_layer is None:
            return
        threshold = value / 100
        self.result.labels = relabel(self.predictor, self.result.probabilities, self.result_axes, threshold)
        self.result.threshold = threshold
        self.labels_layer.data = self.result.labels
        self.threshold_label.setText(f"threshold {threshold:.2f}")
        self.status.setText(self._count_text(self.result))

    def copy_to_annotations(self) -> None:
        """Put the predicted labels of the image on screen into the annotation layer, to be
        corrected with napari's label tools and trained on (Continue in the Train widget)."""
        try:
            if self.result is None or self.result.labels is None:
                raise DenoiSegError("predict first")
            labels = self.result.labels
            target = self.annotations.layer()
            if target is None:
                target = self.viewer.add_labels(np.zeros(labels.shape, np.int32), name="annotations")
                self.annotations.setCurrentText(target.name)
            if tuple(target.data.shape) != labels.shape:
                raise DenoiSegError(f"annotation layer {target.name!r} has shape {tuple(target.data.shape)}, the labels {labels.shape}")
            data = np.array(target.data)
            if self.result_axes.startswith("S"):
                index = int(self.viewer.dims.current_step[self.viewer.dims.ndim - len(self.result_axes)])
                data[index] = labels[index]
                where = f"image {index}"
            else:
                data[...] = labels
                where = "the image"
            target.data = data
            self.status.setText(f"copied the labels of {where} into {target.name!r}: correct them, then Continue training")
        except DenoiSegError as exc:
            notify_user_error(f"error: {exc}")


class ExportWidget(QWidget):
    """``denoiseg zoo export`` from the viewer: a tested bioimage.io package."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        recent = _recent_run.get("run")
        self.source = QLineEdit(str(recent or ""))
        self.out = QLineEdit(str(recent / "denoiseg-model.zip") if recent else "")
        _follow_recent_run(self.source)
        _follow_recent_run(self.out, lambda run_dir: str(run_dir / "denoiseg-model.zip"))
        self.name = QLineEdit("DenoiSeg nuclei model")
        self.authors = QLineEdit("")
        self.authors.setToolTip("comma-separated author names")
        self.license = QLineEdit("CC-BY-4.0")
        self.sample = LayerChoice(napari_viewer, Image, optional=True)
        self.sample.setToolTip("sample image for the package's test tensors and cover (the image on screen)")
        self.sample_axes = _axes_box()
        self.sample.currentTextChanged.connect(self._default_axes)
        self.mask = LayerChoice(napari_viewer, Labels, optional=True)
        self.mask.setToolTip("the sample's instance labels, to report AP and SEG in the package README")
        self.overwrite = QCheckBox("replace an existing package")
        self.export_button = QPushButton("Export")
        self.result_text = QPlainTextEdit()
        self.result_text.setReadOnly(True)
        self.result_text.setMinimumHeight(140)

        form = QFormLayout()
        form.addRow("model", _path_row(self.source, directory=False, filter_="Checkpoints (*.pt)"))
        form.addRow("package", _path_row(self.out, directory=False, save=True, filter_="bioimage.io package (*.zip)"))
        form.addRow("name", self.name)
        form.addRow("authors", self.authors)
        form.addRow("license", self.license)
        form.addRow("sample", self.sample)
        form.addRow("sample axes", self.sample_axes)
        form.addRow("sample labels", self.mask)
        form.addRow("", self.overwrite)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.export_button)
        layout.addWidget(self.result_text)
        self.log_signal = _LogSignal()
        self.log_signal.line.connect(self.result_text.appendPlainText)
        self.export_button.clicked.connect(self.export)
        self.worker = None
        self.result = None
        self._default_axes()

    def _default_axes(self, *_args) -> None:
        layer = self.sample.layer()
        if layer is not None:
            self.sample_axes.setCurrentText(default_axes(layer.ndim))

    def _on_screen(self, layer, axes: str) -> np.ndarray:
        """The layer's image (slice) currently shown."""
        data = _image_data(layer, "the sample")
        if axes.startswith("S"):
            index = int(self.viewer.dims.current_step[self.viewer.dims.ndim - len(axes)])
            return data[min(index, data.shape[0] - 1)]
        return data

    def export(self) -> None:
        from denoiseg_core.io import write_tiff
        from denoiseg_zoo.export import ExportOptions, export_package
        from denoiseg_zoo.runtime import format_summary

        try:
            if not self.source.text().strip() or not self.out.text().strip():
                raise DenoiSegError("choose the model (run folder or .pt) and where to write the package (.zip)")
            source = Path(self.source.text()).expanduser()
            out = Path(self.out.text()).expanduser()
            axes = self.sample_axes.currentText()
            sample = self.sample.layer()
            mask = self.mask.layer()
            sample_data = self._on_screen(sample, axes) if sample is not None else None
            mask_data = self._on_screen(mask, axes) if (mask is not None and sample is not None) else None
            if mask_data is not None and not mask_data.any():
                mask_data = None  # an unpainted image has no labels to score against
            options = dict(
                name=self.name.text().strip() or None,
                authors=[a.strip() for a in self.authors.text().split(",") if a.strip()],
                license=self.license.text().strip() or "CC-BY-4.0",
                overwrite=self.overwrite.isChecked(),
            )
        except DenoiSegError as exc:
            notify_user_error(f"error: {exc}")
            return
        log = self.log_signal.line.emit

        def work():
            with tempfile.TemporaryDirectory(prefix="denoiseg-napari-export-") as tmp:
                samples, masks = [], []
                if sample_data is not None:
                    samples.append(Path(tmp) / "sample.tif")
                    write_tiff(samples[0], sample_data)
                    if mask_data is not None:
                        masks.append(Path(tmp) / "sample_mask.tif")
                        write_tiff(masks[0], mask_data.astype(np.int32))
                result = export_package(source, out, ExportOptions(samples=samples, masks=masks, **options), log=log)
            return result, format_summary(result.summary)

        self.result_text.clear()
        self.export_button.setEnabled(False)
        self.worker = _run_in_thread(work, on_done=self._on_done, on_finished=lambda: self.export_button.setEnabled(True))

    def _on_done(self, value) -> None:
        self.result, summary = value
        self.result_text.appendPlainText(summary)
        self.result_text.appendPlainText(f"package written and tested: {self.result.path}")
        show_info(f"bioimage.io package written and tested: {self.result.path}")


class _LogSignal(QObject):
    line = Signal(str)
