"""Scoring a model on images with ground truth: the one path used by the validation after
every epoch, the threshold tuning at the end of training, ``denoiseg evaluate``,
``denoiseg demo`` and the benchmarks.

Each image is predicted as ``denoiseg predict`` does (whole, or in tiles when large, see
:func:`~denoiseg_core.prediction.predict_image`), turned into instances by the segmentation
head at a foreground threshold, and scored with :mod:`denoiseg_core.metrics`: AP@0.5,
mAP@[0.5:0.95], SEG per image (the DenoiSeg paper's), SEG pooled over all objects, and PSNR
when noise-free images are given.

Precision: a model is predicted, tuned and scored at its run's precision, ``training.precision``
resolved for the device the way the trainer resolves it (:func:`run_precision`; ``auto``: bf16
autocast where the device has native bf16, else float32). So the threshold tuned at the end of
training is scored at the precision it was tuned at, and evaluating a checkpoint on its
validation images reproduces the validation AP it was chosen by. ``denoiseg evaluate
--precision`` overrides it.

Everything that depends on the segmentation head is in four functions: the instance settings
used (:func:`instance_settings`: the tuned ones, else the head's defaults, with the head's
primary threshold set by ``--threshold``), the head's instances with them
(:func:`instance_labels`), and the head's quick tuning after each epoch
(:func:`validation_ap50`) and full tuning at the end of training (:func:`tune_instance_settings`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from pydantic import ValidationError

from denoiseg_core.components import InstanceSettings
from denoiseg_core.errors import ConfigError
from denoiseg_core.metrics import evaluate_segmentation, mean_ap50, psnr
from denoiseg_core.model import BuiltModel, InferenceNet
from denoiseg_core.prediction import Prediction, predict_image
from denoiseg_core.runtime import fold_batch_norm, resolve_device, resolve_precision

if TYPE_CHECKING:
    from denoiseg_core.config import DenoiSegConfig
    from denoiseg_core.data import ImageRecord, Normalization


class EvaluatedModel(Protocol):
    """What evaluation needs of a model: a loaded checkpoint
    (:class:`~denoiseg_core.checkpoint.LoadedModel`) or a run's current network (:class:`LiveModel`)."""

    config: DenoiSegConfig
    built: BuiltModel
    normalization: Normalization
    tuned_settings: InstanceSettings | None
    ndim: int
    in_channels: int

    def inference_net(self) -> InferenceNet: ...


@dataclass
class LiveModel:
    """A network being trained, as a model to evaluate (``built.net`` is the network scored,
    e.g. the moving average of the weights)."""

    config: DenoiSegConfig
    built: BuiltModel
    normalization: Normalization
    tuned_settings: InstanceSettings | None = None

    @classmethod
    def of(cls, config: DenoiSegConfig, built: BuiltModel, net: torch.nn.Module, normalization: Normalization) -> LiveModel:
        return cls(config, replace(built, net=net), normalization)

    @property
    def ndim(self) -> int:
        return self.built.ndim

    @property
    def in_channels(self) -> int:
        return self.built.in_channels

    def inference_net(self) -> InferenceNet:
        return InferenceNet(self.built.net, self.built.head).eval()


@dataclass
class ScoredImage:
    """One image to score: the raw ``(C, *spatial)`` image, its instance mask ``(*spatial)`` and
    optionally the noise-free ``(C, *spatial)`` image (for PSNR)."""

    name: str
    image: np.ndarray
    mask: np.ndarray
    clean: np.ndarray | None = None


# --------------------------------------------------------------------------- precision and prediction


def run_precision(config: DenoiSegConfig, ndim: int, device: torch.device) -> str:
    """The precision a run trains at and its models are validated, tuned and scored at on
    ``device``: ``training.precision`` resolved as for training (``fp32`` or ``bf16``)."""
    return resolve_precision(config.training.precision, device, training_ndim=ndim)


class ImagePredictor:
    """Predicts one raw ``(C, *spatial)`` image at a time with a model (put in eval mode), at
    :attr:`precision` on :attr:`device`; the batch norms are folded into the convolutions once
    for all images."""

    def __init__(
        self,
        model: EvaluatedModel,
        *,
        tile: Sequence[int] | str | None = None,
        batch_size: int = 4,
        device: str | torch.device | None = None,
        precision: str | None = None,
    ):
        """``device``: default where the model is; ``precision``: default the run's (:func:`run_precision`)."""
        self.model, self.tile, self.batch_size = model, tile, batch_size
        self.device = resolve_device(device) or next(model.built.net.parameters()).device
        self.precision = precision or run_precision(model.config, model.ndim, self.device)
        self.net = fold_batch_norm(model.inference_net())

    def __call__(self, image: np.ndarray) -> Prediction:
        return predict_image(
            self.model,
            image,
            tile=self.tile,
            batch_size=self.batch_size,
            device=self.device,
            precision=self.precision,
            net=self.net,
        )


# --------------------------------------------------------------------------- the head


def instance_settings(model: EvaluatedModel, threshold: float | None = None) -> InstanceSettings:
    """The instance settings to segment with: the ones tuned during training, else the head's
    defaults; ``threshold`` (``--threshold``) sets the head's primary threshold."""
    settings = model.tuned_settings if model.tuned_settings is not None else model.built.head.settings()
    if threshold is None:
        return settings
    try:
        return settings.with_threshold(threshold)
    except ValidationError as exc:
        raise ConfigError(f"--threshold {threshold}: {exc.errors()[0]['msg'].lower()} (the head's {settings.primary})") from None


def instance_labels(head, outputs: np.ndarray, settings: InstanceSettings) -> np.ndarray:
    """The head's instance labels ``(*spatial)`` from its outputs ``(K, *spatial)`` with ``settings``."""
    return head.instances(outputs, settings)


def segment(model: EvaluatedModel, prediction: Prediction, settings: InstanceSettings | None = None) -> np.ndarray:
    """Instance labels of a prediction with ``settings``, else :func:`instance_settings`."""
    return instance_labels(model.built.head, prediction.probabilities, settings or instance_settings(model))


def scored_records(records: Iterable[ImageRecord]) -> list[ImageRecord]:
    """The validation images that AP is computed on: labelled ones with at least one object.

    An image without objects scores AP 1 or 0 (any false positive), which rewards high
    thresholds out of all proportion; the test images of a nuclei data set all hold nuclei.
    """
    return [r for r in records if r.labels is not None and np.any(r.labels)]


def _outputs_and_labels(
    model: EvaluatedModel, records: Sequence[ImageRecord], device, precision: str | None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The head's outputs of each record's image (one prediction each) and its labels."""
    predict = ImagePredictor(model, device=device, precision=precision)
    return [predict(r.image).probabilities for r in records], [r.labels for r in records]


def validation_ap50(
    model: EvaluatedModel, records: Sequence[ImageRecord], *, device=None, precision: str | None = None
) -> dict[str, float]:
    """The validation scores of an epoch: mean AP@0.5 over ``records`` (see :func:`scored_records`)
    with the head's default settings (``val_ap50``) and with the best of the head's quick
    tuning (``val_ap50_tuned``, its primary threshold ``val_threshold``; the final tuning searches finer)."""
    head = model.built.head
    outputs, labels = _outputs_and_labels(model, records, device, precision)
    tuning = head.tune(outputs, labels, quick=True)
    scores, default = dict(tuning.table), head.settings()
    return {
        "val_ap50": scores[default] if default in scores else mean_ap50(head, default, outputs, labels),
        "val_ap50_tuned": tuning.score,
        "val_threshold": tuning.settings.primary_threshold,
    }


def tune_instance_settings(
    model: EvaluatedModel, records: Sequence[ImageRecord], *, device=None, precision: str | None = None
) -> tuple[InstanceSettings, dict[str, Any]]:
    """The head's instance settings maximising mean AP@0.5 over ``records`` (the head's ``tune``),
    and a summary (``ap50`` at them, ``settings``, ``candidates``, ``ap50_per_candidate``, ``n_images``)."""
    tuning = model.built.head.tune(*_outputs_and_labels(model, records, device, precision))
    return tuning.settings, {**tuning.summary(), "n_images": len(records)}


# --------------------------------------------------------------------------- scoring


def evaluate(
    model: EvaluatedModel,
    images: Iterable[ScoredImage],
    *,
    threshold: float | None = None,
    tile: Sequence[int] | str | None = None,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    precision: str | None = None,
    on_prediction: Callable[[ScoredImage, Prediction, np.ndarray], None] | None = None,
    denoiser: EvaluatedModel | None = None,
) -> dict[str, Any]:
    """Predict, segment (with :func:`instance_settings`) and score every image.

    Returns :func:`~denoiseg_core.metrics.evaluate_segmentation`'s results plus the
    ``instance_settings`` and ``precision`` used, and, over the images with a noise-free version,
    ``psnr`` of the denoised and ``psnr_input`` of the raw image (also per image).
    ``images`` may be a generator (read one at a time); ``on_prediction(image,
    prediction, labels)`` is called for each (e.g. to write the outputs). ``denoiser``: another
    checkpoint of the same kind (e.g. a run's ``best_denoising.pt``) whose denoised output replaces
    ``model``'s, for PSNR and ``on_prediction``.
    """
    predict = ImagePredictor(model, tile=tile, batch_size=batch_size, device=device, precision=precision)
    denoise = None
    if denoiser is not None:
        denoise = ImagePredictor(denoiser, tile=tile, batch_size=batch_size, device=predict.device, precision=precision)
    settings = instance_settings(model, threshold)
    names, masks, predictions, psnrs = [], [], [], []
    for scored in images:
        prediction = predict(scored.image)
        if denoise is not None:
            prediction = replace(prediction, denoised=denoise(scored.image).denoised)
        labels = instance_labels(model.built.head, prediction.probabilities, settings)
        names.append(scored.name)
        masks.append(scored.mask)
        predictions.append(labels)
        if scored.clean is not None:
            psnrs.append((len(names) - 1, psnr(scored.clean, prediction.denoised), psnr(scored.clean, scored.image)))
        if on_prediction is not None:
            on_prediction(scored, prediction, labels)
    results = evaluate_segmentation(masks, predictions, names=names)
    results.update(instance_settings=settings.model_dump(mode="json"), precision=predict.precision)
    for index, denoised_db, input_db in psnrs:
        results["per_image"][index].update(psnr=denoised_db, psnr_input=input_db)
    if psnrs:
        results["psnr"] = float(np.mean([denoised_db for _, denoised_db, _ in psnrs]))
        results["psnr_input"] = float(np.mean([input_db for _, _, input_db in psnrs]))
    return results


def results_json(results: dict[str, Any]) -> str:
    """:func:`evaluate`'s results as strict JSON (NaN and infinities become null)."""

    def safe(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: safe(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [safe(v) for v in value]
        return value

    return json.dumps(safe(results), indent=2) + "\n"
