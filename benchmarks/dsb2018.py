"""DenoiSeg few-shot benchmark on the real DSB2018 fluorescence nuclei (Buchholz et al. 2020 protocol).

Protocol
--------
* The 494 images are split once, with a fixed seed, into train / validation / test images; the split
  is committed in ``benchmarks/dsb2018_split.json`` and the script refuses to run when the data on disk
  and that file disagree (``--write-split`` creates it for a new data set).
* Pixel-wise Gaussian noise of standard deviation ``--noise`` (0, 10, 20 on the 0..255 scale) is added to
  every image; the noise of an image depends only on ``--data-seed``, the sigma and the image id, so every
  method and training seed sees the same noisy data.
* Training data: all non-overlapping 128x128 crops of the training images. Labels are kept for ``N``
  crops (``--labelled``; chosen with the run seed, the same crops for every method), the others are
  unlabelled. Validation: the (labelled) 128x128 crops of the validation images. Test: the full test
  images with the same kind of noise.
* Methods, at equal budget (same network, steps, batch): ``denoiseg`` (alpha 0.5, all crops),
  ``baseline`` (alpha 0, segmentation only, trained on the N labelled crops only), ``sequential``
  (the paper's "Sequential": Noise2Void on all crops for the first half of the steps, then a fresh
  segmentation-only network on the N2V-denoised labelled crops for the second half; validation and test
  images are denoised by the same N2V network first) and ``n2v`` (alpha 1, pure Noise2Void, for the
  denoising comparison); diagnostic ``baseline_mixed``: alpha 0 on all crops sampled like DenoiSeg (as
  many labelled patches per step as DenoiSeg, a quarter of ``baseline``'s).
* Figures on the test images: AP@0.5 (TP/(TP+FP+FN)), mean AP over IoU 0.5:0.95, SEG (CTC) and the PSNR
  of the denoised output against the noise-free image (per-image range, mean over images).

Usage::

    python benchmarks/dsb2018.py run --budget cpu --noise 20 --labelled 10 --methods denoiseg baseline
    python benchmarks/dsb2018.py report          # table + plot from the JSON (``run`` does this too)

Every run is appended to ``benchmarks/results/dsb2018_results.json`` with its exact command and machine;
the Markdown table and the PNG plot are regenerated from that file.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from denoiseg_core.checkpoint import load_checkpoint, read_checkpoint_state
from denoiseg_core.config import DenoiSegConfig
from denoiseg_core.data import ImageRecord
from denoiseg_core.errors import DenoiSegError
from denoiseg_core.io import atomic_write_bytes, atomic_write_text, read_image
from denoiseg_core.evaluation import ImagePredictor, ScoredImage, evaluate
from denoiseg_core.metrics import psnr
from denoiseg_core.checkpoint import BEST_DENOISING

REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPOSITORY.parent / "shared" / "data" / "dsb2018"
SPLIT_FILE = Path(__file__).resolve().with_name("dsb2018_split.json")
RESULTS_DIR = Path(__file__).resolve().with_name("results")
RESULTS_JSON = "dsb2018_results.json"
RESULTS_TABLE = "dsb2018_results.md"
RESULTS_PLOT = "dsb2018_ap_vs_labels.png"
#: the README's results section; ``report`` refreshes the table between these markers
README_SECTION = "README_SECTION.md"
TABLE_START, TABLE_END = "<!-- dsb2018-table:start -->", "<!-- dsb2018-table:end -->"

CROP_SIZE = 128
SPLIT_SEED = 20180416
SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}


class BenchmarkError(DenoiSegError):
    """The data, the split file or the arguments do not fit the benchmark."""


# --------------------------------------------------------------------------- budgets and methods


@dataclass(frozen=True)
class Budget:
    """Network and schedule of one training budget (identical for every method)."""

    #: where and how long it runs (the rest of :attr:`description` comes from the fields)
    note: str
    backbone: dict[str, Any]
    patch_size: int
    batch_size: int
    epochs: int
    steps_per_epoch: int
    lr_patience: int
    #: validation crops scored (AP) after each epoch; ``None``: all of them
    validation_images: int | None
    learning_rate: float = 4e-4

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def description(self) -> str:
        learning_rate = f"{self.learning_rate:.0e}".replace("e-0", "e-")  # 4e-4, as the paper writes it
        shape = " (the paper shape: halved second convolutions)" if self.backbone.get("halve_second_conv") else ""
        dropout = f", dropout {self.backbone['dropout']}" if self.backbone.get("dropout") else ""
        return (
            f"U-Net depth {self.backbone['depth']}, {self.backbone['first_filters']} first filters{shape}{dropout}, batch "
            f"{self.batch_size}, {self.patch_size}x{self.patch_size} patches, {self.epochs} epochs x "
            f"{self.steps_per_epoch} steps, Adam {learning_rate} halved after {self.lr_patience} epochs "
            f"without improvement ({self.note})"
        )


_CPU_BUDGET = Budget(
    note="about 8 min of training per run on 2 quiet AMD EPYC cores",
    backbone={"depth": 3, "first_filters": 16},
    patch_size=64,
    batch_size=32,
    epochs=30,
    steps_per_epoch=100,
    lr_patience=4,
    validation_images=64,
)
BUDGETS: dict[str, Budget] = {
    "cpu": _CPU_BUDGET,
    "paper": Budget(
        note="the paper's schedule, for a GPU",
        backbone={"depth": 4, "first_filters": 32},
        patch_size=64,
        batch_size=128,
        epochs=200,
        steps_per_epoch=400,
        lr_patience=10,
        validation_images=None,
    ),
    "short": replace(_CPU_BUDGET, note="exploration, about 5 min on 2 CPU cores", epochs=8, lr_patience=2),
    # the cpu budget's network and batch for a third of its steps: recipes are screened with it first
    # (its ranking of recipes is checked against the cpu budget's in the ablation table)
    "screen": replace(_CPU_BUDGET, note="a third of the cpu budget's steps, for screening recipes", epochs=10,
                      lr_patience=2),
    "tiny": Budget(
        note="smoke test only, seconds",
        backbone={"depth": 2, "first_filters": 8},
        patch_size=32,
        batch_size=4,
        epochs=2,
        steps_per_epoch=3,
        lr_patience=2,
        validation_images=4,
    ),
}

#: method -> loss weight alpha of the denoising term. ``sequential``'s alpha is that of its
#: segmentation stage (its first stage is pure N2V).
METHOD_ALPHA = {"denoiseg": 0.5, "baseline": 0.0, "n2v": 1.0, "sequential": 0.0}


#: the benchmark's network before dropout 0.2 became the ``unet`` backbone's default
_NO_DROPOUT = {"dropout": 0.0}


@dataclass(frozen=True)
class Recipe:
    """A named training recipe: a method plus the training settings it changes.

    ``training`` holds ``training.*`` config values; ``warm_start_fraction`` there is turned into
    ``warm_start_epochs`` of the budget. A recipe that leaves a setting out gets the config's
    default, so ``default`` is exactly what ``denoiseg train`` does. ``backbone`` changes the
    budget's U-Net parameters (by default it keeps the network every recipe ran with before dropout
    joined the default recipe: no dropout; ``default`` sets nothing, so it gets the ``unet``
    backbone's defaults) and ``epochs_scale`` its number of epochs (a bigger network at equal
    wall-clock time trains fewer steps).
    """

    method: str
    description: str
    training: dict[str, Any] = field(default_factory=dict)
    backbone: dict[str, Any] = field(default_factory=lambda: dict(_NO_DROPOUT))
    epochs_scale: float = 1.0

    def budget(self, budget: Budget) -> Budget:
        """``budget`` with this recipe's network and number of epochs."""
        if not self.backbone and self.epochs_scale == 1.0:
            return budget
        epochs = max(1, round(budget.epochs * self.epochs_scale))
        note = budget.note if epochs == budget.epochs else f"{budget.note}; {epochs} of its {budget.epochs} epochs for this recipe's network"
        return replace(budget, backbone={**budget.backbone, **self.backbone}, epochs=epochs,
                       lr_patience=max(1, round(budget.lr_patience * self.epochs_scale)), note=note)


#: the settings of the first DenoiSeg port (before this ablation); recipes below change one lever
#: at a time from ``TUNED``, which only picks checkpoints at the tuned threshold
_LEVERS_OFF = {"ema_decay": None, "warm_start_epochs": 0, "weight_decay": 0.0, "intensity_jitter": 0.0,
               "semi_supervised": None, "loss_weighting": "fixed", "labelled_fraction_final": None,
               "denoising_finish_fraction": 0.0}
_V1 = {**_LEVERS_OFF, "labelled_fraction": 0.25, "best_metric": "val_ap50"}
_TUNED = {**_V1, "best_metric": "val_ap50_tuned"}
_MEAN_TEACHER = {"name": "mean_teacher", "params": {}}
_PSEUDO_LABELS = {"name": "mean_teacher", "params": {"loss": "cross_entropy", "confidence": 0.9, "weight": 1.0}}
_COMBO_D = {**_TUNED, "ema_decay": 0.99, "labelled_fraction": 0.5, "semi_supervised": _PSEUDO_LABELS}
_COMBO_D_JITTER = {**_COMBO_D, "intensity_jitter": 0.2}
_COMBO_E = {**_COMBO_D_JITTER, "loss_weighting": "uncertainty"}
_COMBO_F = {**_COMBO_E, "labelled_fraction": 0.75, "labelled_fraction_final": 0.25, "denoising_finish_fraction": 1 / 3}
_COMBO_F_CONSTANT = {**_COMBO_F, "labelled_fraction_final": None}
RECIPES: dict[str, Recipe] = {
    "baseline": Recipe("baseline", "segmentation only (alpha 0) on the labelled crops, checkpoint by AP at "
                       "threshold 0.5", {**_V1, "labelled_fraction": None}),
    "baseline_ema": Recipe("baseline", "the baseline with the evaluation levers every recipe may use: EMA 0.99 "
                           "and checkpoint by AP at the tuned threshold",
                           {**_TUNED, "labelled_fraction": None, "ema_decay": 0.99}),
    "baseline_dropout": Recipe("baseline", "the baseline with dropout 0.2 on the U-Net's bottleneck and lower decoder "
                               "features (the default recipe's regulariser: is the gain joint training's or dropout's?)",
                               {**_V1, "labelled_fraction": None}, backbone={"dropout": 0.2}),
    "sequential": Recipe("sequential", "the paper's Sequential: N2V for half the steps, then segmentation only "
                         "on the denoised labelled crops", {**_V1, "labelled_fraction": None}),
    "n2v": Recipe("n2v", "pure Noise2Void (alpha 1), for the denoising comparison",
                  {**_LEVERS_OFF, "labelled_fraction": None, "best_metric": "val_loss"}),
    "paper": Recipe("denoiseg", "the paper's DenoiSeg: alpha 0.5, batches drawn uniformly from all crops, "
                    "checkpoint by validation loss", {**_LEVERS_OFF, "labelled_fraction": None, "best_metric": "val_loss"}),
    "denoiseg_v1": Recipe("denoiseg", "the first port's default: a quarter of each batch labelled, checkpoint by "
                          "AP at threshold 0.5", _V1),
    "tuned_ckpt": Recipe("denoiseg", "denoiseg_v1, checkpoint by AP at each epoch's best threshold", _TUNED),
    "ema": Recipe("denoiseg", "tuned_ckpt + EMA of the weights (decay 0.99)", {**_TUNED, "ema_decay": 0.99}),
    "warm_start": Recipe("denoiseg", "tuned_ckpt + N2V-only warm start for the first third of the epochs",
                         {**_TUNED, "warm_start_fraction": 1 / 3}),
    "mean_teacher": Recipe("denoiseg", "tuned_ckpt + EMA 0.99 + mean-teacher consistency on every patch",
                           {**_TUNED, "ema_decay": 0.99, "semi_supervised": _MEAN_TEACHER}),
    "half_labelled": Recipe("denoiseg", "tuned_ckpt with half of each batch from labelled crops",
                            {**_TUNED, "labelled_fraction": 0.5}),
    "alpha_0.3": Recipe("denoiseg", "tuned_ckpt with alpha 0.3 (more weight on segmentation)", {**_TUNED, "alpha": 0.3}),
    "weight_decay": Recipe("denoiseg", "tuned_ckpt + AdamW weight decay 0.01", {**_TUNED, "weight_decay": 0.01}),
    "intensity_jitter": Recipe("denoiseg", "tuned_ckpt + random gain/offset 0.2 per patch",
                               {**_TUNED, "intensity_jitter": 0.2}),
    "pseudo_labels": Recipe("denoiseg", "tuned_ckpt + EMA 0.99 + the teacher's confident classes (> 0.9) as "
                            "pseudo-labels on every patch (mean_teacher with cross_entropy, weight 1)",
                            {**_TUNED, "ema_decay": 0.99, "semi_supervised": _PSEUDO_LABELS}),
    "combo_a": Recipe("denoiseg", "EMA + warm start + mean teacher",
                      {**_TUNED, "ema_decay": 0.99, "warm_start_fraction": 1 / 3, "semi_supervised": _MEAN_TEACHER}),
    "combo_b": Recipe("denoiseg", "EMA + mean teacher + half labelled",
                      {**_TUNED, "ema_decay": 0.99, "labelled_fraction": 0.5, "semi_supervised": _MEAN_TEACHER}),
    "combo_d": Recipe("denoiseg", "EMA + pseudo-labels + half labelled (the default before alpha 0.3)", _COMBO_D),
    # one more lever at a time on top of combo_d
    "combo_d_alpha_0.3": Recipe("denoiseg", "combo_d with alpha 0.3 (more weight on segmentation; once the default recipe)",
                                {**_COMBO_D, "alpha": 0.3}),
    "combo_d_weight_decay": Recipe("denoiseg", "combo_d + AdamW weight decay 0.05", {**_COMBO_D, "weight_decay": 0.05}),
    "combo_d_jitter": Recipe("denoiseg", "combo_d + random gain/offset 0.2 per patch", _COMBO_D_JITTER),
    # one more lever at a time on top of combo_d_jitter
    "combo_d_jitter_alpha_ramp": Recipe("denoiseg", "combo_d_jitter with alpha falling linearly from 0.5 to 0.2 over the "
                                 "steps (denoising first, segmentation later)", {**_COMBO_D_JITTER, "alpha_final": 0.2}),
    "combo_d_jitter_uncertainty": Recipe("denoiseg", "combo_d_jitter with learned loss weights (uncertainty "
                                         "weighting, Kendall et al. 2018) instead of alpha (the default recipe before combo_f)", _COMBO_E),
    "combo_d_jitter_labelled_ramp": Recipe("denoiseg", "combo_d_jitter with the labelled fraction of each batch falling "
                                    "linearly from 0.75 to 0.25", {**_COMBO_D_JITTER, "labelled_fraction": 0.75,
                                                                  "labelled_fraction_final": 0.25}),
    "combo_d_jitter_elastic": Recipe("denoiseg", "combo_d_jitter + elastic deformation (2 px) of half the labelled patches",
                              {**_COMBO_D_JITTER, "elastic_deformation": 2.0}),
    # levers combined on combo_d_jitter_uncertainty (called combo_e below)
    "combo_e_labelled_ramp": Recipe("denoiseg", "combo_d_jitter_uncertainty with the labelled fraction of each batch falling "
                                    "linearly from 0.75 to 0.25", {**_COMBO_E, "labelled_fraction": 0.75,
                                                                  "labelled_fraction_final": 0.25}),
    "combo_e_elastic": Recipe("denoiseg", "combo_d_jitter_uncertainty + elastic deformation (2 px) of half the labelled patches",
                              {**_COMBO_E, "elastic_deformation": 2.0}),
    "combo_e_ramp_elastic": Recipe("denoiseg", "combo_d_jitter_uncertainty + labelled fraction 0.75 -> 0.25 + elastic 2 px",
                                   {**_COMBO_E, "labelled_fraction": 0.75, "labelled_fraction_final": 0.25,
                                    "elastic_deformation": 2.0}),
    # chosen on validation among the combinations above (screen, 3 seeds), with the denoising finish
    "combo_f": Recipe("denoiseg", "combo_d_jitter_uncertainty with the labelled fraction falling from 0.75 to 0.25 over "
                      "the joint epochs, then Noise2Void alone for the last third (for best_denoising.pt): the default "
                      "recipe before combo_f_labelled_constant", _COMBO_F),
    # levers taken off combo_f, for N = 38 where it trailed the baseline
    "combo_f_no_pseudo_labels": Recipe("denoiseg", "combo_f without the semi-supervised term (no pseudo-labels; EMA kept)",
                                       {**_COMBO_F, "semi_supervised": None}),
    "combo_f_labelled_constant": Recipe("denoiseg", "combo_f with a constant labelled share of 0.75 (no ramp down): "
                                        "the default recipe before dropout", _COMBO_F_CONSTANT),
    "combo_f_pseudo_unlabelled_only": Recipe("denoiseg", "combo_f with the pseudo-labels on the unlabelled patches only "
                                             "(FixMatch style; the labelled ones keep their true labels alone)",
                                             {**_COMBO_F, "semi_supervised": {
                                                 **_PSEUDO_LABELS, "params": {**_PSEUDO_LABELS["params"], "unlabelled_only": True}}}),
    # the levers not yet measured on combo_f_labelled_constant, one at a time
    "combo_f_labelled_constant_warm_start": Recipe("denoiseg", "combo_f_labelled_constant with Noise2Void alone for the first "
                                                   "fifth of the epochs (self-supervised warm start)",
                                                   {**_COMBO_F_CONSTANT, "warm_start_fraction": 1 / 5}),
    "combo_f_labelled_constant_mse": Recipe("denoiseg", "combo_f_labelled_constant with mean-teacher consistency (squared "
                                            "difference of the probabilities, weight 3, every pixel) instead of the "
                                            "teacher's confident classes as pseudo-labels",
                                            {**_COMBO_F_CONSTANT, "semi_supervised": _MEAN_TEACHER}),
    "combo_f_labelled_constant_dropout": Recipe("denoiseg", "combo_f_labelled_constant with dropout 0.2 on the U-Net's "
                                                "bottleneck and lower decoder features while training: the default recipe",
                                                _COMBO_F_CONSTANT, backbone={"dropout": 0.2}),
    "combo_f_labelled_constant_dropout_0.4": Recipe("denoiseg", "combo_f_labelled_constant with dropout 0.4 (as "
                                                    "combo_f_labelled_constant_dropout, stronger)",
                                                    _COMBO_F_CONSTANT, backbone={"dropout": 0.4}),
    "combo_f_labelled_constant_noise": Recipe("denoiseg", "combo_f_labelled_constant with extra Gaussian noise (standard deviation "
                                              "up to 0.5 normalised units, about 15 on the 0..255 scale) on half of the "
                                              "labelled patches", {**_COMBO_F_CONSTANT, "noise_augmentation": 0.5}),
    "combo_e_denoising_finish": Recipe("denoiseg", "combo_d_jitter_uncertainty, its last third of the epochs Noise2Void only "
                                       "(for best_denoising.pt; best.pt comes from the joint epochs)",
                                       {**_COMBO_E, "denoising_finish_fraction": 1 / 3}),
    # equal wall-clock time: on 2 CPU cores (bf16) a training step of the default recipe takes 0.383 s with
    # this network and 0.193 s with the budgets' depth-3/16 U-Net (batch 32, 64x64), so it gets half the epochs
    "combo_d_jitter_paper_unet": Recipe("denoiseg", "combo_d_jitter on the paper's U-Net shape (depth 4, 32 first filters, "
                                 "halved second convolutions, 5.5 M parameters) for half the epochs (equal "
                                 "wall-clock time on CPU)", _COMBO_D_JITTER, backbone={"depth": 4, "first_filters": 32,
                                                                      "halve_second_conv": True, **_NO_DROPOUT},
                                 epochs_scale=0.5),
    "combo_c": Recipe("denoiseg", "EMA + warm start + half labelled",
                      {**_TUNED, "ema_decay": 0.99, "warm_start_fraction": 1 / 3, "labelled_fraction": 0.5}),
    "default": Recipe("denoiseg", "the defaults of `denoiseg train` (TrainingConfig and the unet backbone's "
                      "parameters but its size), nothing overridden", backbone={}),
}
#: recipes drawn as lines in the plot, with their colours: the default, the recipe before it, the baselines and
#: the paper's recipes (the README table has every recipe)
_PLOT_COLOURS = {"default": "tab:red", "combo_f_labelled_constant_dropout": "tab:red", "combo_f_labelled_constant": "gold",
                 "baseline": "tab:green", "baseline_dropout": "tab:olive", "sequential": "tab:purple", "paper": "tab:orange"}
#: the budget the plot shows when its runs are there (the one the README's targets are on)
_PLOTTED_BUDGET = "cpu"
#: what the legend says beside a recipe's name
_PLOT_NOTES = {"combo_f_labelled_constant_dropout": "the default", "combo_f_labelled_constant": "the default before dropout"}
_BUDGET_MARKERS = {"cpu": "o", "screen": "s", "paper": "D"}


# --------------------------------------------------------------------------- data and split


@dataclass
class Sample:
    """One DSB2018 image: raw (noise-free) intensities and instance labels."""

    image_id: str
    clean: np.ndarray  # float32 (Y, X), 0..255
    labels: np.ndarray  # int32 (Y, X)


def read_index(data_dir: Path) -> list[str]:
    """The image ids listed in ``index.csv`` (sorted); every id needs an image and a mask."""
    index = data_dir / "index.csv"
    if not index.is_file():
        raise BenchmarkError("index.csv not found (is this the DSB2018 folder? see --data)", index)
    with index.open(newline="") as handle:
        ids = sorted(row["image_id"] for row in csv.DictReader(handle))
    if not ids:
        raise BenchmarkError("no images listed", index)
    for image_id in ids:
        for kind in ("images", "masks"):
            if not (data_dir / kind / f"{image_id}.tif").is_file():
                raise BenchmarkError(f"{kind}/{image_id}.tif listed in index.csv is missing", data_dir)
    return ids


def make_split(ids: Sequence[str], seed: int = SPLIT_SEED, fractions: dict[str, float] = SPLIT_FRACTIONS) -> dict:
    """A seeded train/val/test split of ``ids`` (each part sorted)."""
    order = np.random.default_rng(seed).permutation(sorted(ids))
    n_train = int(round(fractions["train"] * len(order)))
    n_val = int(round(fractions["val"] * len(order)))
    parts = {"train": order[:n_train], "val": order[n_train : n_train + n_val], "test": order[n_train + n_val :]}
    return {
        "description": "fixed split of the DSB2018 fluorescence images into train / val / test "
        "(see benchmarks/dsb2018.py)",
        "seed": seed,
        "fractions": fractions,
        "n_images": len(order),
        **{name: sorted(part.tolist()) for name, part in parts.items()},
    }


def load_split(path: Path, ids: Sequence[str]) -> dict[str, list[str]]:
    """Read the committed split and check it covers exactly the images on disk."""
    if not path.is_file():
        raise BenchmarkError("split file not found (create it once with --write-split)", path)
    try:
        split = json.loads(path.read_text())
        parts = {name: list(split[name]) for name in ("train", "val", "test")}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise BenchmarkError(f"not a valid split file ({type(exc).__name__}: {exc})", path) from None
    listed = [i for part in parts.values() for i in part]
    if len(listed) != len(set(listed)):
        raise BenchmarkError("an image id appears twice in the split", path)
    if set(listed) != set(ids):
        missing, extra = set(ids) - set(listed), set(listed) - set(ids)
        raise BenchmarkError(
            f"split disagrees with the data ({len(missing)} image(s) on disk not in the split, "
            f"{len(extra)} in the split not on disk); the split must never change silently",
            path,
        )
    return parts


def load_samples(data_dir: Path, ids: Sequence[str]) -> list[Sample]:
    samples = []
    for image_id in ids:
        image = read_image(data_dir / "images" / f"{image_id}.tif")
        labels = read_image(data_dir / "masks" / f"{image_id}.tif")
        if image.ndim != 2 or labels.shape != image.shape:
            raise BenchmarkError(
                f"expected a 2-D image and a mask of its shape, got {image.shape} and {labels.shape}",
                data_dir / "images" / f"{image_id}.tif",
            )
        samples.append(Sample(image_id, image.astype(np.float32), labels.astype(np.int32)))
    return samples


def noisy_version(sample: Sample, sigma: float, data_seed: int) -> np.ndarray:
    """The image plus Gaussian noise that depends only on (data seed, sigma, image id)."""
    if sigma <= 0:
        return sample.clean.copy()
    rng = np.random.default_rng([data_seed, int(round(sigma * 1000)), zlib.crc32(sample.image_id.encode())])
    return (sample.clean + rng.normal(0.0, sigma, size=sample.clean.shape)).astype(np.float32)


def grid_crops(array: np.ndarray, size: int = CROP_SIZE) -> list[np.ndarray]:
    """Non-overlapping ``size`` x ``size`` crops on a grid from the top-left corner (the rest is dropped)."""
    rows, cols = array.shape[0] // size, array.shape[1] // size
    return [array[r * size : (r + 1) * size, c * size : (c + 1) * size] for r in range(rows) for c in range(cols)]


def crop_records(samples: Sequence[Sample], sigma: float, data_seed: int) -> list[ImageRecord]:
    """Labelled 128x128 crop records (noisy image, clean image, labels) of ``samples``."""
    records = []
    for sample in samples:
        noisy = noisy_version(sample, sigma, data_seed)
        crops = zip(grid_crops(noisy), grid_crops(sample.clean), grid_crops(sample.labels))
        for k, (img, clean, lab) in enumerate(crops):
            records.append(
                ImageRecord(
                    image=np.ascontiguousarray(img[np.newaxis]),
                    labels=np.ascontiguousarray(lab),
                    path=Path(f"{sample.image_id}_crop{k}"),
                    clean=np.ascontiguousarray(clean[np.newaxis]),
                )
            )
    return records


def few_shot(records: Sequence[ImageRecord], n_labelled: int, seed: int) -> tuple[list[ImageRecord], list[int]]:
    """Keep labels for ``n_labelled`` crops (seeded choice); the others become unlabelled."""
    if n_labelled > len(records):
        raise BenchmarkError(f"--labelled {n_labelled} but there are only {len(records)} training crops")
    keep = sorted(np.random.default_rng([seed, 2]).choice(len(records), size=n_labelled, replace=False).tolist())
    chosen = set(keep)
    out = [r if i in chosen else ImageRecord(r.image, None, r.path, r.clean) for i, r in enumerate(records)]
    return out, keep


# --------------------------------------------------------------------------- one run


@dataclass
class RunSpec:
    budget: str
    recipe: str
    noise: float
    n_labelled: int
    seed: int
    precision: str = "auto"

    @property
    def method(self) -> str:
        return RECIPES[self.recipe].method

    def key(self) -> str:
        return f"{self.budget}/n{self.noise:g}/N{self.n_labelled}/{self.recipe}/seed{self.seed}"


@dataclass
class Prepared:
    """The benchmark's data at one noise level."""

    train_crops: list[ImageRecord]
    val_crops: list[ImageRecord]
    test_images: list[np.ndarray]
    test_clean: list[np.ndarray]
    test_labels: list[np.ndarray]
    test_ids: list[str]
    split_counts: dict[str, int] = field(default_factory=dict)
    #: what the networks are given at test time, when not the noisy test images (Sequential)
    test_inputs: list[np.ndarray] | None = None


def prepare(data_dir: Path, split: dict[str, list[str]], sigma: float, data_seed: int, limit: int | None) -> Prepared:
    parts = {name: ids[:limit] if limit else ids for name, ids in split.items()}
    train = load_samples(data_dir, parts["train"])
    val = load_samples(data_dir, parts["val"])
    test = load_samples(data_dir, parts["test"])
    return Prepared(
        train_crops=crop_records(train, sigma, data_seed),
        val_crops=crop_records(val, sigma, data_seed),
        test_images=[noisy_version(s, sigma, data_seed) for s in test],
        test_clean=[s.clean for s in test],
        test_labels=[s.labels for s in test],
        test_ids=[s.image_id for s in test],
        split_counts={name: len(ids) for name, ids in parts.items()},
    )


def make_config(spec: RunSpec, budget: Budget, run_dir: Path, method: str | None = None) -> DenoiSegConfig:
    """The training config of ``spec`` (``method`` overrides the recipe's, e.g. Sequential's N2V stage)."""
    method = method or spec.method
    training: dict[str, Any] = {} if method == "n2v" and spec.method != "n2v" else dict(RECIPES[spec.recipe].training)
    if method == "n2v":  # also Sequential's first stage
        training.update(RECIPES["n2v"].training)
    fraction = training.pop("warm_start_fraction", None)
    if fraction:
        training["warm_start_epochs"] = max(1, round(fraction * budget.epochs))
    training.setdefault("alpha", METHOD_ALPHA[method])
    return DenoiSegConfig.model_validate(
        {
            "seed": spec.seed,
            "run_dir": str(run_dir),
            "data": {"patch_size": [budget.patch_size, budget.patch_size]},
            "model": {"backbone": {"name": "unet", "params": budget.backbone}},
            "training": {
                "epochs": budget.epochs,
                "steps_per_epoch": budget.steps_per_epoch,
                "batch_size": budget.batch_size,
                "learning_rate": budget.learning_rate,
                "lr_patience": budget.lr_patience,
                # pure N2V trains no segmentation: scoring one validation crop keeps the log honest and cheap
                "validation_images": 1 if method == "n2v" else budget.validation_images,
                "threshold_tuning": method != "n2v",
                "device": "auto",
                "precision": spec.precision,
                **training,
            },
        }
    )


def evaluate_run(checkpoint: Path, data: Prepared, segmentation: bool) -> dict[str, Any]:
    """Test figures of a checkpoint on the full test images, at the run's precision (see
    :mod:`denoiseg_core.evaluation`).

    ``data.test_inputs`` (when set) is what the network is given instead of the noisy test images
    (Sequential's segmentation stage sees N2V-denoised images); PSNR always compares the network's
    denoised channel with the noise-free image, and 'PSNR input' the noisy image.
    """
    model = load_checkpoint(checkpoint)
    inputs = data.test_inputs if data.test_inputs is not None else data.test_images
    denoised: list[np.ndarray] = []
    result: dict[str, Any] = {"ap50": None, "map": None, "seg": None, "seg_pooled": None}
    if segmentation:

        def keep_denoised(_image: ScoredImage, prediction, _labels: np.ndarray) -> None:
            denoised.append(prediction.denoised[0])

        images = (ScoredImage(name, given[np.newaxis], labels) for name, given, labels in zip(data.test_ids, inputs, data.test_labels))
        scores = evaluate(model, images, device="auto", on_prediction=keep_denoised)
        result = {key: scores[key] for key in result}
    else:
        predict = ImagePredictor(model, device="auto")
        denoised = [predict(given[np.newaxis]).denoised[0] for given in inputs]
    return {
        **_test_psnr(denoised, data),
        "psnr_noisy_input": _test_psnr(data.test_images, data)["psnr"],
        "threshold": model.tuned_settings.primary_threshold if model.tuned_settings is not None else None,  # the primary one
        "n_test_images": len(data.test_images),
        **result,
    }


def run_one(spec: RunSpec, data: Prepared, work_dir: Path, log) -> dict[str, Any]:
    """Train one method at one setting and evaluate it on the test images."""
    from denoiseg_core.training import Trainer

    budget = RECIPES[spec.recipe].budget(BUDGETS[spec.budget])
    train_crops, labelled_indices = few_shot(data.train_crops, spec.n_labelled, spec.seed)
    if spec.method in ("baseline", "sequential"):
        train_records = [r for r in train_crops if r.labels is not None]
        if not train_records:
            raise BenchmarkError(f"{spec.method} needs at least one labelled crop (--labelled >= 1)")
    else:
        train_records = train_crops
    run_dir = work_dir / spec.key().replace("/", "_")
    started = time.perf_counter()
    val_records = data.val_crops
    if spec.method == "sequential":
        # equal budget: half of the epochs denoise, the other half segment
        budget = replace(budget, epochs=max(1, budget.epochs // 2))
        n2v_config = make_config(spec, budget, run_dir.with_name(run_dir.name + "_stage1_n2v"), method="n2v")
        log("-- sequential, stage 1: Noise2Void on all training crops")
        n2v = Trainer(n2v_config, progress=False, log=log, records=(train_crops, data.val_crops)).fit()
        denoiser = ImagePredictor(load_checkpoint(n2v.best_checkpoint), device="auto")
        train_records = [_denoised_record(denoiser, r) for r in train_records]
        val_records = [_denoised_record(denoiser, r) for r in data.val_crops]
        data = replace(data, test_inputs=[_denoise(denoiser, image) for image in data.test_images])
        log("-- sequential, stage 2: segmentation only, on the denoised labelled crops")
    config = make_config(spec, budget, run_dir)
    trainer = Trainer(config, progress=False, log=log, records=(train_records, val_records))
    outcome = trainer.fit()
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    figures = evaluate_run(outcome.best_checkpoint, data, segmentation=spec.method != "n2v")
    best_denoising = outcome.run_dir / BEST_DENOISING
    figures["psnr_best_denoising"] = (
        evaluate_run(best_denoising, data, segmentation=False)["psnr"] if best_denoising.is_file() else None
    )
    if spec.method == "sequential":
        # its denoising is stage 1's; the segmentation network's own denoising channel is untrained
        figures.update(_test_psnr(data.test_inputs, data))
        figures["psnr_best_denoising"] = figures["psnr"]
    return {
        "key": spec.key(),
        "budget": spec.budget,
        "recipe": spec.recipe,
        "method": spec.method,
        "noise": spec.noise,
        "n_labelled": spec.n_labelled,
        "seed": spec.seed,
        "training": config.training.model_dump(mode="json", exclude={"device", "precision"}),
        "precision": trainer.precision,
        **figures,
        "validation_ap50_tuned": outcome.validation.get("ap50"),
        "epochs_run": len(outcome.history),
        "best_epoch": int(read_checkpoint_state(outcome.best_checkpoint)["epoch"]),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(time.perf_counter() - started, 1),
        "n_train_crops": len(train_records),
        "n_val_crops": len(data.val_crops),
        "labelled_crops": [data.train_crops[i].name for i in labelled_indices],
        "split_images": data.split_counts,
        "budget_description": budget.description,
    }


def _denoise(predict: ImagePredictor, image: np.ndarray) -> np.ndarray:
    """The denoised channel of a 2-D image ``(Y, X)``, same shape, raw intensity units."""
    return predict(image[np.newaxis]).denoised[0]


def _denoised_record(predict: ImagePredictor, record: ImageRecord) -> ImageRecord:
    return replace(record, image=_denoise(predict, record.image[0])[np.newaxis])


def _test_psnr(denoised_images: Sequence[np.ndarray], data: Prepared) -> dict[str, float]:
    """Mean PSNR of (denoised or noisy) test images against the noise-free ones: ``psnr`` with each
    image's own range (images without a range are left out), ``psnr_255`` with the range 255."""
    pairs = list(zip(denoised_images, data.test_clean))
    ranged = [psnr(clean, image) for image, clean in pairs if clean.max() > clean.min()]
    return {
        "psnr": float(np.mean(ranged)) if ranged else math.nan,
        "psnr_255": float(np.mean([psnr(clean, image, data_range=255.0) for image, clean in pairs])),
    }


# --------------------------------------------------------------------------- results


def machine_description() -> dict[str, Any]:
    import torch

    from denoiseg_core.runtime import cpu_model_name

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_model_name(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "os": platform.platform(),
    }


def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        return json.loads(path.read_text())
    return {"benchmark": "dsb2018", "runs": []}


def save_results(path: Path, results: dict[str, Any], new_runs: Sequence[dict[str, Any]]) -> None:
    """Merge ``new_runs`` into the JSON (a rerun of the same key replaces the old one)."""
    by_key = {run["key"]: run for run in results["runs"]}
    for run in new_runs:
        by_key[run["key"]] = run
    results["runs"] = sorted(by_key.values(), key=lambda r: r["key"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=1, allow_nan=True) + "\n")


#: figures averaged over seeds in the report
FIGURES = ("ap50", "map", "seg", "seg_pooled", "psnr", "psnr_best_denoising", "psnr_noisy_input",
           "validation_ap50_tuned")


def summarise(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of every figure, per (budget, noise, N, recipe)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["budget"], run["noise"], run["n_labelled"], run["recipe"]), []).append(run)
    order = list(RECIPES)
    rows = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], order.index(k[3]) if k[3] in order else len(order))):
        members = groups[key]
        row = {"budget": key[0], "noise": key[1], "n_labelled": key[2], "recipe": key[3],
               "method": members[0]["method"], "seeds": sorted(m["seed"] for m in members),
               "commands": sorted({m["command"] for m in members}),
               "machines": sorted({_machine_line(m["machine"]) for m in members}),
               "train_minutes": float(np.mean([m["train_seconds"] for m in members])) / 60}
        for name in FIGURES:
            if name.startswith("psnr") and name != "psnr_noisy_input" and row["method"] == "baseline":
                row[name] = None  # alpha 0 never trains the denoising channel: its PSNR means nothing
                continue
            values = [m[name] for m in members if m.get(name) is not None and not math.isnan(m[name])]
            # the noisy input is the same for every seed: no spread to show
            spread = len(values) > 1 and name != "psnr_noisy_input"
            row[name] = (float(np.mean(values)), float(np.std(values)) if spread else None) if values else None
        rows.append(row)
    return rows


def _machine_line(machine: dict[str, Any]) -> str:
    where = machine["gpu"] or f"{machine['cpu']}, {machine['torch_threads']} torch threads"
    return f"{where} (torch {machine['torch']})"


def _cell(value: tuple[float, float | None] | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    mean, spread = value
    if math.isinf(mean):
        return "∞ (no noise)"
    return f"{mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")


def _validation_choice(rows: Sequence[dict[str, Any]]) -> dict[tuple, str]:
    """Per (budget, noise, N): the DenoiSeg recipe with the highest mean validation AP (never the test),
    among those that ran the most seeds there (a mean over one lucky seed does not beat one over three)."""
    candidates = [r for r in rows if r["method"] == "denoiseg" and r["validation_ap50_tuned"] is not None]
    most_seeds: dict[tuple, int] = {}
    for row in candidates:
        setting = (row["budget"], row["noise"], row["n_labelled"])
        most_seeds[setting] = max(most_seeds.get(setting, 0), len(row["seeds"]))
    best: dict[tuple, tuple[float, str]] = {}
    for row in candidates:
        setting, value = (row["budget"], row["noise"], row["n_labelled"]), row["validation_ap50_tuned"][0]
        if len(row["seeds"]) < most_seeds[setting]:
            continue
        if setting not in best or value > best[setting][0]:
            best[setting] = (value, row["recipe"])
    return {setting: recipe for setting, (_, recipe) in best.items()}


def markdown_table(results: dict[str, Any]) -> str:
    rows = summarise(results["runs"])
    chosen = _validation_choice(rows)
    baselines = {(r["budget"], r["noise"], r["n_labelled"]): r["ap50"] for r in rows if r["recipe"] == "baseline"}
    lines = [
        "# DSB2018 few-shot ablation (generated by `python benchmarks/dsb2018.py report`)",
        "",
        "Test split: the 99 full held-out images, same noise as training. AP@0.5 = TP/(TP+FP+FN); mAP = mean AP",
        "over IoU 0.5:0.95; SEG = CTC SEG averaged over images as the paper ('SEG pooled': over all objects);",
        "PSNR (dB) of the denoised output against the noise-free image (per-image range, mean over images), from",
        "the checkpoint that segments best ('PSNR') and from `best_denoising.pt` ('PSNR dn'). 'Δ base' = AP@0.5",
        "minus the baseline's. 'val AP' = validation AP@0.5 at the tuned threshold, what recipes are chosen by",
        "(★ = best DenoiSeg recipe on validation at that setting, among those with the most seeds there). Mean ± std over seeds (no ± = one seed).",
        "",
        "| budget | noise | N | recipe | seeds | AP@0.5 | Δ base | mAP | SEG | SEG pooled | PSNR | PSNR dn "
        "| val AP | train min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        setting = (row["budget"], row["noise"], row["n_labelled"])
        base = baselines.get(setting)
        delta = f"{row['ap50'][0] - base[0]:+.3f}" if base and row["ap50"] and row["recipe"] != "baseline" else "-"
        star = " ★" if chosen.get(setting) == row["recipe"] else ""
        lines.append(
            f"| {row['budget']} | n{row['noise']:g} | {row['n_labelled']} | {row['recipe']}{star} | "
            f"{len(row['seeds'])} | {_cell(row['ap50'])} | {delta} | {_cell(row['map'])} | {_cell(row['seg'])} | "
            f"{_cell(row['seg_pooled'])} | {_cell(row['psnr'], 2)} | {_cell(row['psnr_best_denoising'], 2)} | "
            f"{_cell(row['validation_ap50_tuned'])} | {row['train_minutes']:.1f} |"
        )
    lines += ["", "### Recipes", ""]
    for name in [n for n in RECIPES if any(r["recipe"] == n for r in rows)]:
        lines.append(f"- `{name}` ({RECIPES[name].method}): {RECIPES[name].description}")
    lines += ["", "### Commands and machines", ""]
    seen: set[str] = set()
    for row in rows:
        for command in row["commands"]:
            if command not in seen:
                seen.add(command)
                lines.append(f"- `{command}`")
    lines.append("")
    for machine in sorted({m for row in rows for m in row["machines"]}):
        lines.append(f"- machine: {machine}")
    lines += ["", "### Budgets", ""]
    for name in sorted({row["budget"] for row in rows}):
        lines.append(f"- `{name}`: {BUDGETS[name].description if name in BUDGETS else '?'}")
    return "\n".join(lines) + "\n"


#: the paper's DSB2018 test AP@0.5 (TensorFlow, full schedule, mean of 5 runs), for scale in the plot:
#: (noise sigma, labelled crops) -> recipe -> AP@0.5
PAPER_AP50 = {
    (20.0, 10): {"baseline": 0.549, "paper": 0.678},
    (0.0, 10): {"baseline": 0.579, "paper": 0.625},
}
_NOISE_LINES = {0.0: "-.", 10.0: ":", 20.0: "-", 40.0: "--"}


def plot_png(results: dict[str, Any]) -> bytes:
    """AP@0.5 against the number of labelled crops: one line per recipe, budget and noise (colour: recipe,
    marker: budget, line: noise), mean ± std over seeds, with the paper's figures as hollow markers for scale."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = tuple(_PLOT_COLOURS)
    rows = [r for r in summarise(results["runs"]) if r["recipe"] in shown and r["ap50"] is not None]
    if any(r["budget"] == _PLOTTED_BUDGET for r in rows):
        rows = [r for r in rows if r["budget"] == _PLOTTED_BUDGET]
    fig, ax = plt.subplots(figsize=(9.6, 4.6))
    series: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault((row["budget"], row["noise"], row["recipe"]), []).append(row)
    for (budget, noise, recipe), members in sorted(series.items(), key=lambda kv: str(kv[0])):
        members.sort(key=lambda r: r["n_labelled"])
        # a small sideways shift per recipe and budget so error bars at the same count do not hide each other
        shift = 1.0 + 0.02 * (shown.index(recipe) - len(shown) / 2) + (0.006 if budget == "screen" else 0.0)
        x = [r["n_labelled"] * shift for r in members]
        y = [r["ap50"][0] for r in members]
        err = [r["ap50"][1] or 0.0 for r in members]
        seeds = "/".join(sorted({str(len(r["seeds"])) for r in members}))
        ax.errorbar(x, y, yerr=err, color=_PLOT_COLOURS[recipe], marker=_BUDGET_MARKERS.get(budget, "P"),
                    linestyle=_NOISE_LINES.get(noise, ":"), capsize=3,
                    label=f"{recipe}{' = ' + _PLOT_NOTES[recipe] if recipe in _PLOT_NOTES else ''} ({budget}, n{noise:g}; {seeds} seed(s))")
    shown_noise = {row["noise"] for row in rows}
    first = True
    for (noise, count), figures in sorted(PAPER_AP50.items()):
        if noise not in shown_noise:
            continue
        for recipe, value in figures.items():
            ax.plot([count], [value], linestyle="none", marker="*",
                    markersize=9, markerfacecolor="none", markeredgecolor=_PLOT_COLOURS[recipe],
                    label="hollow: paper (full schedule, 5 runs)" if first else None)
            first = False
    ax.set_xscale("log")
    counts = sorted({r["n_labelled"] for r in rows})
    if counts:
        ax.minorticks_off()
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_xlim(min(counts) / 1.5, max(counts) * 1.5)
    ax.set_xlabel("labelled 128x128 training crops")
    ax.set_ylabel("test AP@0.5")
    lowest = min([r["ap50"][0] - (r["ap50"][1] or 0.0) for r in rows] + [min(min(f.values()) for f in PAPER_AP50.values())])
    ax.set_ylim(max(0.0, round(lowest - 0.05, 1)), 1)
    ax.set_title("DSB2018 few-shot: recipes against the segmentation-only baseline")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def table_body(results: dict[str, Any]) -> str:
    """What goes between the README's table markers: the Markdown report without its title line."""
    return markdown_table(results).split("\n", 2)[2]


def refresh_table(document: Path, body: str) -> bool:
    """Replace the text between the table markers of ``document``; False when it has no markers."""
    if not document.is_file():
        return False
    text = document.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        return False
    before, rest = text.split(TABLE_START, 1)
    after = rest.split(TABLE_END, 1)[1]
    atomic_write_text(document, f"{before}{TABLE_START}\n{body}{TABLE_END}{after}")
    return True


def write_report(results_dir: Path) -> None:
    """Markdown table and PNG plot from the results JSON; refresh the README section's table.

    For the committed results (the default ``--results-dir``) the repository's README.md table is
    refreshed too, so what the README shows is always the benchmark's own output.
    """
    results = load_results(results_dir / RESULTS_JSON)
    atomic_write_text(results_dir / RESULTS_TABLE, markdown_table(results))
    atomic_write_bytes(results_dir / RESULTS_PLOT, plot_png(results))
    documents = [results_dir / README_SECTION]
    if results_dir.resolve() == RESULTS_DIR:
        documents.append(REPOSITORY / "README.md")
    for document in documents:
        refresh_table(document, table_body(results))


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate, append to the results JSON, redraw table and plot")
    run.add_argument("--data", type=Path, default=DEFAULT_DATA, help="DSB2018 folder (images/, masks/, index.csv)")
    run.add_argument("--split", type=Path, default=SPLIT_FILE, help="the committed split file")
    run.add_argument("--write-split", action="store_true", help="create the split file (refuses to overwrite one)")
    run.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    run.add_argument("--noise", type=float, nargs="+", default=[20.0],
                     help="Gaussian noise sigma(s) on the 0..255 scale")
    run.add_argument("--labelled", type=int, nargs="+", default=[10], help="number(s) of labelled training crops")
    run.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=["default", "baseline"],
                     help="training recipes (see RECIPES in this file)")
    run.add_argument("--seeds", type=int, nargs="+", default=[0],
                     help="training seeds (also choose the labelled crops)")
    run.add_argument("--data-seed", type=int, default=0, help="seed of the noise")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                     help="training precision (auto: bf16 where the hardware has it natively)")
    run.add_argument("--limit-images", type=int, default=None,
                     help="use only the first K images of each split part (smoke tests)")
    run.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    run.add_argument("--jobs", type=int, default=1,
                     help="runs at once, each in its own process with one torch thread (e.g. many on one GPU)")
    run.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    run.add_argument("--work-dir", type=Path, default=None, help="where run folders go (default: a temporary folder)")
    report = sub.add_parser("report", help="regenerate the Markdown table and PNG plot from the results JSON")
    report.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    choose = sub.add_parser("choose", help="print the recipe with the best mean validation AP at one setting")
    choose.add_argument("recipes", nargs="+", choices=list(RECIPES))
    choose.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    choose.add_argument("--noise", type=float, default=20.0)
    choose.add_argument("--labelled", type=int, default=10)
    choose.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    return parser.parse_args(argv)


def command_line(argv: Sequence[str]) -> str:
    return "python benchmarks/dsb2018.py " + " ".join(shlex.quote(a) for a in argv)


def choose_by_validation(results: dict[str, Any], recipes: Sequence[str], budget: str, noise: float,
                         n_labelled: int) -> tuple[str, dict[str, float]]:
    """The recipe among ``recipes`` with the highest mean validation AP (tuned) at the setting."""
    means = {}
    for recipe in recipes:
        values = [r["validation_ap50_tuned"] for r in results["runs"]
                  if (r["budget"], r["noise"], r["n_labelled"], r["recipe"]) == (budget, noise, n_labelled, recipe)
                  and r.get("validation_ap50_tuned") is not None]
        if values:
            means[recipe] = float(np.mean(values))
    if not means:
        raise BenchmarkError(f"no runs of {', '.join(recipes)} at {budget}/n{noise:g}/N{n_labelled}")
    return max(means, key=means.get), means


#: data prepared in this process, per (noise, data seed, image limit): workers reuse it between runs
_PREPARED: dict[tuple, Prepared] = {}


def _run_task(spec: RunSpec, data_dir: Path, split: dict[str, list[str]], data_seed: int, limit: int | None,
              work_dir: Path, threads: int | None) -> dict[str, Any]:
    """One run, in this process or a worker: prepares (and keeps) the data of its noise level."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    key = (spec.noise, data_seed, limit)
    if key not in _PREPARED:
        _PREPARED[key] = prepare(data_dir, split, spec.noise, data_seed, limit)
    lines: list[str] = []
    run = run_one(spec, _PREPARED[key], work_dir, log=lines.append)
    run["log_tail"] = lines[-3:]
    return run


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.command == "report":
        write_report(args.results_dir)
        print(f"wrote {args.results_dir / RESULTS_TABLE} and {args.results_dir / RESULTS_PLOT}")
        return 0
    if args.command == "choose":
        results = load_results(args.results_dir / RESULTS_JSON)
        best, means = choose_by_validation(results, args.recipes, args.budget, args.noise, args.labelled)
        print(json.dumps(means), file=sys.stderr)
        print(best)
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    ids = read_index(args.data)
    if args.write_split:
        if args.split.exists():
            raise BenchmarkError(
                "split file exists; it must never change silently (delete it by hand to redo)", args.split
            )
        atomic_write_text(args.split, json.dumps(make_split(ids), indent=1) + "\n")
        print(f"wrote {args.split}")
    split = load_split(args.split, ids)
    command, machine = command_line(argv), machine_description()
    results_path = args.results_dir / RESULTS_JSON
    specs = [RunSpec(args.budget, recipe, sigma, n_labelled, seed, args.precision)
             for sigma in args.noise for n_labelled in args.labelled for seed in args.seeds for recipe in args.recipes]

    def finished(run: dict[str, Any]) -> None:
        run.update(command=command, machine=machine,
                   finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        shown = ("key", "ap50", "seg", "psnr", "psnr_best_denoising", "validation_ap50_tuned", "threshold",
                 "best_epoch", "train_seconds", "eval_seconds")
        print(json.dumps({k: run.get(k) for k in shown}), flush=True)
        # saved after every run so a long sweep keeps what it finished
        save_results(results_path, load_results(results_path), [run])
        write_report(args.results_dir)

    with tempfile.TemporaryDirectory(prefix="dsb2018-") as tmp:
        work_dir = args.work_dir or Path(tmp)
        task = (args.data, split, args.data_seed, args.limit_images, work_dir)
        if args.jobs <= 1:
            for spec in specs:
                print(f"== {spec.key()}", flush=True)
                finished(_run_task(spec, *task, threads=args.threads))
            return 0
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        failures = 0
        # spawn: CUDA cannot be used in forked children
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_run_task, spec, *task, threads=args.threads or 1): spec for spec in specs}
            for future in as_completed(futures):
                try:
                    finished(future.result())
                except Exception as exc:  # noqa: BLE001 (one failed run must not lose the others)
                    failures += 1
                    print(f"!! {futures[future].key()} failed: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DenoiSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
