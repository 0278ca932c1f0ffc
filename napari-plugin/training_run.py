"""Training from the viewer with the CLI's trainer and run folder, plus Stop and Continue.

:class:`WidgetTrainer` is denoiseg's :class:`~denoiseg_core.training.Trainer` with two
additions made through its public ``train_step``: it reports every step and every finished
epoch to callbacks (the widget turns them into Qt signals), and it raises
:class:`TrainingStopped` at the next step once the stop flag is set. Stopping therefore
behaves like Ctrl-C in ``denoiseg train``: ``last.pt`` holds the last finished epoch, and
Continue resumes from it exactly as ``denoiseg train --resume`` does.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from denoiseg_core.components import InstanceSettings
from denoiseg_core.checkpoint import read_checkpoint_state
from denoiseg_core.cli.demo import DEMO_OVERRIDES
from denoiseg_core.config import DenoiSegConfig, load_config
from denoiseg_core.errors import DenoiSegError
from denoiseg_core.training import Trainer, resume_config

from denoiseg_napari.layer_data import ImageLayer, TrainingFolders, write_training_data

#: the recipes offered besides a config file: ``quick`` is ``denoiseg demo``'s small U-Net and
#: short schedule (minutes on a laptop CPU), ``default`` the defaults of ``denoiseg config init``
#: (the paper's network and schedule: hours on a CPU, for a GPU)
RECIPES: dict[str, dict] = {"quick": DEMO_OVERRIDES, "default": {}}

#: seconds between step reports (each one crosses into the Qt main thread)
STEP_REPORT_INTERVAL = 0.2


class TrainingStopped(Exception):
    """Raised inside the training loop when the user pressed Stop."""


@dataclass
class TrainingCallbacks:
    """Called from the training thread; the widget relays them to the main thread."""

    step: Callable[[int, int, float], None] = lambda done, total, loss: None
    epoch: Callable[[dict], None] = lambda values: None
    message: Callable[[str], None] = lambda text: None


@dataclass
class TrainingRequest:
    """What the Train widget asks for."""

    run_dir: Path
    recipe: str = "quick"  # a key of RECIPES, or "file"
    config_file: Path | None = None
    epochs: int | None = None
    steps_per_epoch: int | None = None
    batch_size: int | None = None
    patch_size: list[int] | None = None
    backbone: str | None = None
    extra_overrides: list[str] = field(default_factory=list)  # ``--set``-style, e.g. for tests


@dataclass
class TrainingOutcome:
    run_dir: Path
    finished: bool  # False: stopped; last.pt holds the last finished epoch (if any)
    epochs_done: int
    instance_settings: InstanceSettings | None = None  # tuned after the last epoch


class WidgetTrainer(Trainer):
    """The CLI's trainer, reporting progress and honouring a stop flag between steps."""

    def __init__(self, config: DenoiSegConfig, *, callbacks: TrainingCallbacks, stop: threading.Event, resume: bool):
        self.callbacks = callbacks
        self.stop_flag = stop
        self._reported_epochs = 0
        self._last_report = 0.0
        super().__init__(config, resume=resume, progress=False, log=callbacks.message)
        self._reported_epochs = len(self.history)

    def train_step(self, batch, step: int = 0):
        if self.stop_flag.is_set():
            raise TrainingStopped
        self.report_epochs()
        losses = super().train_step(batch, step)
        cfg = self.config.training
        now = time.perf_counter()
        if now - self._last_report >= STEP_REPORT_INTERVAL or step == cfg.steps_per_epoch - 1:
            self._last_report = now
            done = self.epoch * cfg.steps_per_epoch + step + 1
            self.callbacks.step(done, cfg.epochs * cfg.steps_per_epoch, float(losses[0]))
        return losses

    def report_epochs(self) -> None:
        """Send the log rows of epochs finished since the last report."""
        for values in self.history[self._reported_epochs :]:
            self.callbacks.epoch(dict(values))
        self._reported_epochs = len(self.history)


def recipe_base(recipe: str) -> dict:
    if recipe not in RECIPES:
        raise DenoiSegError(f"unknown recipe {recipe!r} (choose {', '.join(RECIPES)} or a config file)")
    return json.loads(json.dumps(RECIPES[recipe]))


def build_config(request: TrainingRequest, folders: TrainingFolders) -> DenoiSegConfig:
    """The run's config: recipe or file, then the widget's overrides, then the data folder."""
    overrides = [f"run_dir={request.run_dir}", f"data.train={folders.train}"]
    overrides.append(f"data.validation={folders.validation}" if folders.validation else "data.validation=null")
    if request.epochs is not None:
        overrides.append(f"training.epochs={request.epochs}")
    if request.steps_per_epoch is not None:
        overrides.append(f"training.steps_per_epoch={request.steps_per_epoch}")
    if request.batch_size is not None:
        overrides.append(f"training.batch_size={request.batch_size}")
    if request.patch_size is not None:
        overrides.append(f"data.patch_size={list(request.patch_size)}")
    overrides.extend(request.extra_overrides)
    if request.recipe == "file":
        if request.config_file is None:
            raise DenoiSegError("choose a config file for the 'config file' recipe")
        config = load_config(request.config_file, overrides)
    else:
        config = load_config(None, overrides, base=recipe_base(request.recipe))
    if request.backbone and request.backbone != config.model.backbone.name:
        # another backbone's parameters need not fit this one: it starts from its defaults
        config.model.backbone = type(config.model.backbone)(name=request.backbone)
    return config


def data_folder(run_dir: Path) -> Path:
    """Where the widget writes the layers for the trainer (inside the run folder, so a run
    carries the exact images and masks it was trained on)."""
    return Path(run_dir) / "napari_data"


def completed_epochs(run_dir: Path) -> int | None:
    """Epochs in the run's ``last.pt``, or None when it has none yet."""
    last = Path(run_dir) / "last.pt"
    return int(read_checkpoint_state(last)["epoch"]) if last.is_file() else None


def run_training(
    request: TrainingRequest,
    layers: list[ImageLayer],
    annotations,
    *,
    resume: bool,
    callbacks: TrainingCallbacks,
    stop: threading.Event,
) -> TrainingOutcome:
    """Write the layers into the run's data folder and train (or continue) the run.

    ``resume``: continue the run in ``request.run_dir`` from its ``last.pt`` with the
    current annotations; a stopped run goes on to its planned epochs, a finished one gets
    ``request.epochs`` more (the same as ``denoiseg train --resume --set training.epochs=N``).
    Without ``resume`` the run folder must not hold a run yet (as with ``denoiseg train``).
    """
    run_dir = Path(request.run_dir)
    done = completed_epochs(run_dir) if resume else None
    if not resume and (run_dir / "last.pt").exists():
        raise DenoiSegError("run folder already holds a training run (press Continue, or choose another run folder)", run_dir)
    folders = write_training_data(data_folder(run_dir), layers, annotations)
    callbacks.message(f"{folders.n_images} images, {folders.n_labelled} labelled, written to {folders.train}")
    if done is None:  # a new run (or Continue before any epoch finished)
        config = build_config(request, folders)
    else:
        config = resume_config(run_dir)
        config.data.train = folders.train
        config.data.validation = folders.validation
        planned = config.training.epochs
        config.training.epochs = planned if done < planned else done + (request.epochs or planned)
    trainer = WidgetTrainer(config, callbacks=callbacks, stop=stop, resume=done is not None)
    try:
        result = trainer.fit()
    except TrainingStopped:
        trainer.report_epochs()
        callbacks.message(f"stopped after epoch {trainer.epoch} (press Continue to resume)")
        return TrainingOutcome(run_dir, finished=False, epochs_done=completed_epochs(run_dir) or 0)
    trainer.report_epochs()
    return TrainingOutcome(run_dir, finished=True, epochs_done=trainer.epoch, instance_settings=result.instance_settings)
