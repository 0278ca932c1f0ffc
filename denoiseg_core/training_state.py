"""The state of a training run: what it carries from step to step besides the network's
definition and the data, what ``last.pt`` stores so that a resumed run continues exactly
(bit for bit with ``training.num_workers: 0``), and which epochs were the best so far.

* :class:`RandomStreams`: the patch and mask generators of this process and torch's and
  Python's global streams.
* :class:`BestEpochs`: the values ``best.pt`` and ``best_denoising.pt`` were chosen by.
* :class:`TrainingState`: the weights and their moving average, optimizer, learning-rate
  schedule, epoch, history, best values and random streams; it writes checkpoints and
  restores itself from ``last.pt``.
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from denoiseg_core.checkpoint import load_weights, save_checkpoint
from denoiseg_core.components import InstanceSettings
from denoiseg_core.config import DenoiSegConfig, TrainingConfig
from denoiseg_core.data import Normalization
from denoiseg_core.losses import UncertaintyWeighting
from denoiseg_core.model import BuiltModel


@dataclasses.dataclass(frozen=True)
class LinearRamp:
    """``start`` at step 0, ``end`` from step ``steps`` on, linear in between (a plain object,
    so data-loader workers can take it)."""

    start: float
    end: float
    steps: int

    def __call__(self, step: float) -> float:
        return self.start + (self.end - self.start) * min(1.0, max(0.0, step / max(1, self.steps)))


@dataclasses.dataclass(frozen=True)
class LabelledFractionSchedule:
    """The labelled fraction of the run's ``i``-th batch: ``ramp(i)`` (``None``: the sampler's own
    fraction) before batch ``uniform_from``, 0 from it on, i.e. every patch drawn from all images
    (the denoising finish). A plain object, so data-loader workers can take it."""

    ramp: LinearRamp | None = None
    uniform_from: int | None = None

    def __call__(self, index: int) -> float | None:
        if self.uniform_from is not None and index >= self.uniform_from:
            return 0.0
        return self.ramp(index) if self.ramp is not None else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RandomStreams:
    """The random streams of one process of a run: :attr:`patches` (which patches are drawn
    and how they are augmented), :attr:`masks` (blind spots and intensity jitter) and the
    global streams of torch and Python.

    Rank 0 of a fresh run seeds with the config seed itself, so one process and rank 0 of many
    draw the same patches; other ranks get their own streams."""

    def __init__(self, seed: int, rank: int, device: torch.device):
        self.seed, self.rank = seed, rank
        self.patches = np.random.default_rng(self._seed())
        self.masks = torch.Generator(device=device).manual_seed(self._seed(torch_seed=True))

    def _seed(self, torch_seed: bool = False, epoch: int | None = None):
        if self.rank == 0 and epoch is None:
            return self.seed
        if torch_seed:
            return int(np.random.default_rng([self.seed, self.rank, epoch or 0, 1]).integers(2**62))
        return [self.seed, self.rank, epoch or 0]

    def state(self) -> dict[str, Any]:
        return {
            "numpy_rng": self.patches.bit_generator.state,
            "mask_generator": self.masks.get_state(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        }

    def restore(self, saved: dict[str, Any], epoch: int) -> None:
        """Continue from :meth:`state` saved after ``epoch``."""
        if self.rank == 0:
            self.patches.bit_generator.state = saved["numpy_rng"]
            self.masks.set_state(saved["mask_generator"])
        else:  # last.pt holds rank 0's streams; the others start fresh ones for this epoch
            self.patches = np.random.default_rng(self._seed(epoch=epoch))
            self.masks.manual_seed(self._seed(torch_seed=True, epoch=epoch))
        torch.set_rng_state(saved["torch_rng"])
        random.setstate(saved["python_rng"])


class BestEpochs:
    """The best validation values so far: ``training.best_metric`` (``best.pt``; the
    validation loss when the metric is NaN, e.g. no labelled validation image) and the
    validation denoising loss (``best_denoising.pt``, when denoising is trained)."""

    def __init__(self, training: TrainingConfig):
        self.metric = training.best_metric
        self.denoising_trained = training.alpha != 0 or training.warm_start_epochs != 0  # a finish needs alpha > 0
        self.value: float | None = None
        self.denoise_value: float | None = None

    def improves(self, values: dict[str, float]) -> bool:
        """Whether an epoch's ``values`` beat the best so far (then they are the best)."""
        metric, value = self.metric, values[self.metric]
        if math.isnan(value):
            metric, value = "val_loss", values["val_loss"]
        if self.value is None or (value < self.value if metric == "val_loss" else value > self.value):
            self.value = value
            return True
        return False

    def improves_denoising(self, values: dict[str, float]) -> bool:
        """Whether an epoch has the lowest validation denoising loss so far (then it is the best)."""
        value = values["val_denoise"]
        if not self.denoising_trained or math.isnan(value):
            return False
        if self.denoise_value is not None and value >= self.denoise_value:
            return False
        self.denoise_value = value
        return True


class TrainingState:
    """Everything a run changes as it trains: the weights of ``net`` (trained in place) and
    their moving average, the optimizer, the learning-rate schedule, the epoch, the history
    (one row of values per epoch), the best values and the random streams."""

    def __init__(self, net: torch.nn.Module, training: TrainingConfig, streams: RandomStreams, device: torch.device):
        self.net = net
        # learned weights of the two loss terms (training.loss_weighting "uncertainty"), optimised with the net
        self.loss_weighting = UncertaintyWeighting().to(device) if training.loss_weighting == "uncertainty" else None
        parameters: list[dict[str, Any]] = [{"params": list(net.parameters())}]
        if self.loss_weighting is not None:
            parameters.append({"params": list(self.loss_weighting.parameters()), "weight_decay": 0.0})
        # fused Adam: one kernel for all parameters on the GPU; AdamW decouples weight decay
        optimizer_class = torch.optim.AdamW if training.weight_decay > 0 else torch.optim.Adam
        self.optimizer = optimizer_class(
            parameters,
            lr=training.learning_rate,
            weight_decay=training.weight_decay,
            fused=device.type == "cuda" or None,
        )
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=training.lr_factor, patience=training.lr_patience
        )
        # The moving average of the weights is what validation, checkpoints and export use.
        self.ema: torch.optim.swa_utils.AveragedModel | None = None
        if training.ema_decay is not None:
            self.ema = torch.optim.swa_utils.AveragedModel(
                net,
                multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(training.ema_decay),
                use_buffers=True,  # batch-norm statistics are averaged too
            )
        self.streams = streams
        self.best = BestEpochs(training)
        self.epoch = 0
        self.history: list[dict[str, float]] = []

    @property
    def eval_net(self) -> torch.nn.Module:
        """The network that is validated, saved and exported: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.net

    def step_done(self) -> None:
        """After an optimizer step: the moving average follows the weights."""
        if self.ema is not None:
            self.ema.update_parameters(self.net)

    def _resumable(self) -> dict[str, Any]:
        """The ``training_state`` entry of ``last.pt``."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "history": self.history,
            "best_value": self.best.value,
            "best_denoise_value": self.best.denoise_value,
            # the trained (student) weights and the average; model_state holds the average
            "student_state": self.net.state_dict() if self.ema is not None else None,
            "ema_state": self.ema.state_dict() if self.ema is not None else None,
            "loss_weighting": self.loss_weighting.state_dict() if self.loss_weighting is not None else None,
            **self.streams.state(),
        }

    def save(
        self,
        path: Path,
        *,
        config: DenoiSegConfig,
        built: BuiltModel,
        normalization: Normalization,
        resumable: bool,
        instance_settings: InstanceSettings | None = None,
        extra: dict | None = None,
        epoch: int | None = None,
    ) -> None:
        """A checkpoint of :attr:`eval_net` (of ``epoch``, default the current one); ``resumable``:
        with everything needed to resume (``last.pt``)."""
        save_checkpoint(
            path,
            config=config,
            built=built,
            normalization=normalization,
            instance_settings=instance_settings,
            epoch=self.epoch if epoch is None else epoch,
            training_state=self._resumable() if resumable else None,
            extra=extra,
            model_state=self.eval_net.state_dict(),
        )

    def restore(self, checkpoint: dict[str, Any], path: Path) -> None:
        """Continue from a ``last.pt`` (read from ``path``)."""
        saved = checkpoint["training_state"]
        if self.ema is not None and saved.get("ema_state") is not None:
            load_weights(self.net, saved["student_state"], path)
            self.ema.load_state_dict(saved["ema_state"])
        else:  # also a run saved before it kept a moving average: the average starts from these weights
            load_weights(self.net, checkpoint["model_state"], path)
            if self.ema is not None:
                self.ema.module.load_state_dict(self.net.state_dict())
        if self.loss_weighting is not None and saved.get("loss_weighting") is not None:
            self.loss_weighting.load_state_dict(saved["loss_weighting"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.history = list(saved["history"])
        self.best.value = saved["best_value"]
        self.best.denoise_value = saved.get("best_denoise_value")
        self.epoch = int(checkpoint["epoch"])
        self.streams.restore(saved, self.epoch)
