"""What the built-in class heads (``three_class``, ``two_class``) share: class-index targets,
class-weighted cross-entropy, softmax probabilities and one foreground-probability threshold
as their instance setting, tuned on a grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pydantic import Field
from skimage.segmentation import relabel_sequential
from torch import nn

from denoiseg_core.components import HeadOutputs, InstanceSettings, OutputChannel, TargetSpec
from denoiseg_core.losses import labelled_weighted_cross_entropy
from denoiseg_core.metrics import Tuning, tune_by_grid

FOREGROUND = 1


class ForegroundThreshold(InstanceSettings):
    """Instance setting of the class heads."""

    threshold: float = Field(0.5, gt=0, lt=1, description="a pixel is foreground where its foreground probability is above this")


#: thresholds tried when tuning; per-epoch validation tries every other one and 0.5
THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.1, 0.95, 0.05), 2))


class ClassHead:
    """The shared part of a head whose channels are class probabilities (softmax); subclasses
    set ``classes`` (name and meaning per class, background first) and implement ``targets``,
    ``instances``, ``instances_text`` and ``imagej_macro``."""

    classes: tuple[tuple[str, str], ...]
    target = TargetSpec("int64")
    settings = ForegroundThreshold

    def __init__(self, params):
        self.params = params

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """Class-weighted cross-entropy, the mean over all pixels of labelled patches."""
        return labelled_weighted_cross_entropy(logits, targets, labelled, self.params.class_weights)

    def activation(self) -> nn.Module:
        return nn.Softmax(dim=1)

    def tune(self, outputs: Sequence[np.ndarray], labels: Sequence[np.ndarray], *, quick: bool = False) -> Tuning:
        """The foreground threshold with the best mean AP@0.5 (``quick``: 0.1 apart, and 0.5)."""
        thresholds = sorted(set(THRESHOLDS[::2]) | {0.5}) if quick else THRESHOLDS
        return tune_by_grid(self, [ForegroundThreshold(threshold=t) for t in thresholds], outputs, labels)

    def outputs(self) -> HeadOutputs:
        return HeadOutputs(
            channels=tuple(OutputChannel(name, "probability", meaning) for name, meaning in self.classes),
            activation_code="torch.softmax(segmentation, dim=1)",
            summary="class probabilities (softmax inside the network, they sum to 1)",
        )

    def _check_shape(self, probabilities: np.ndarray) -> np.ndarray:
        probabilities = np.asarray(probabilities)
        if probabilities.ndim < 3 or probabilities.shape[0] != self.num_classes:
            raise ValueError(f"expected probabilities ({self.num_classes}, *spatial), got shape {probabilities.shape}")
        return probabilities

    def _remove_small(self, labels: np.ndarray) -> np.ndarray:
        """Drop instances under ``params.min_size`` pixels and number the rest 1..n, as int32."""
        if self.params.min_size > 0 and labels.max() > 0:
            sizes = np.bincount(labels.ravel())
            small = sizes < self.params.min_size
            small[0] = False
            labels = np.where(small[labels], 0, labels)
        return relabel_sequential(labels)[0].astype(np.int32)
