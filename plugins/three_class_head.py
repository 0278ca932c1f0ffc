"""The built-in ``three_class`` segmentation head (DenoiSeg): background, foreground, border.

Training targets mark object borders (``skimage.segmentation.find_boundaries``) as a
third class so touching objects are separated; instances are the connected components
of the thresholded foreground probability, optionally grown back into the predicted
border they lost to it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from scipy import ndimage
from skimage.segmentation import expand_labels, find_boundaries, relabel_sequential
from torch import nn

from denoiseg_core.components import ComponentParams, HeadSpec
from denoiseg_core.hookspecs import hookimpl
from denoiseg_core.losses import labelled_weighted_cross_entropy

BACKGROUND, FOREGROUND, BORDER = 0, 1, 2


class ThreeClassParams(ComponentParams):
    """Parameters of the ``three_class`` head (paper defaults)."""

    class_weights: tuple[float, float, float] = Field(
        (1.0, 1.0, 5.0), description="cross-entropy weights of background, foreground, border"
    )
    border_mode: Literal["outer", "inner", "thick"] = Field(
        "outer", description="which pixels form an object's border (skimage find_boundaries mode)"
    )
    grow_into_border: bool = Field(
        True, description="grow instances into adjacent predicted border pixels that belong to objects"
    )
    min_size: int = Field(0, ge=0, description="remove instances smaller than this many pixels")


class ThreeClassHead:
    """Implements :class:`denoiseg_core.components.SegmentationHead` for 2D and 3D."""

    num_classes = 3
    channel_names = ("background", "foreground", "border")
    threshold_candidates = tuple(float(t) for t in np.round(np.arange(0.1, 0.95, 0.05), 2))

    def __init__(self, params: ThreeClassParams | None = None):
        self.params = params or ThreeClassParams()

    def targets(self, labels: np.ndarray) -> np.ndarray:
        """Instance labels -> class indices (0 background, 1 foreground, 2 border), int64."""
        labels = np.asarray(labels)
        border = find_boundaries(labels, mode=self.params.border_mode)
        out = np.full(labels.shape, BACKGROUND, dtype=np.int64)
        out[(labels > 0) & ~border] = FOREGROUND
        out[border] = BORDER
        return out

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """Class-weighted cross-entropy, the mean over all pixels of labelled patches."""
        return labelled_weighted_cross_entropy(logits, targets, labelled, self.params.class_weights)

    def activation(self) -> nn.Module:
        return nn.Softmax(dim=1)

    def instances(self, probabilities: np.ndarray, threshold: float) -> np.ndarray:
        """Class probabilities ``(3, *spatial)`` of one image -> int32 instance labels."""
        probabilities = np.asarray(probabilities)
        if probabilities.ndim < 3 or probabilities.shape[0] != self.num_classes:
            raise ValueError(f"expected probabilities (3, *spatial), got shape {probabilities.shape}")
        foreground = probabilities[FOREGROUND] > threshold
        labels, _ = ndimage.label(foreground)  # default cross structure: touching diagonals stay apart
        if self.params.grow_into_border:
            labels = self._grow_into_border(labels, probabilities, foreground)
        if self.params.min_size > 0 and labels.max() > 0:
            sizes = np.bincount(labels.ravel())
            small = sizes < self.params.min_size
            small[0] = False
            labels[small[labels]] = 0
            labels = relabel_sequential(labels)[0]
        return labels.astype(np.int32)

    def _grow_into_border(self, labels: np.ndarray, probabilities: np.ndarray, foreground: np.ndarray) -> np.ndarray:
        """Give instances back the border pixels that belonged to them in the targets.

        The border is one pixel wide on each side of a label change, so instances grow by
        one pixel (diagonals included) into predicted border. With ``inner`` and
        ``thick`` borders, the border pixel next to an object is part of it. With ``outer``
        borders only the pixels between touching objects are (the ring around an object
        lies in the background), so border pixels next to predicted background are left out.
        """
        border = ~foreground & (probabilities[BORDER] > probabilities[BACKGROUND])
        if self.params.border_mode == "outer":
            background = ~foreground & ~border
            border &= ~ndimage.binary_dilation(background)
        # Reach the diagonal neighbours too (an object's corner pixels are border pixels),
        # but never two pixels deep: a contact border is one pixel on each object's side.
        grown = expand_labels(labels, distance=float(np.sqrt(labels.ndim)) + 1e-6)
        return np.where(border & (labels == 0), grown, labels)


def build_three_class(params: ThreeClassParams) -> ThreeClassHead:
    return ThreeClassHead(params)


@hookimpl
def denoiseg_register_heads() -> list[HeadSpec]:
    return [
        HeadSpec(
            name="three_class",
            params=ThreeClassParams,
            build=build_three_class,
            description="background / foreground / border classes, weighted cross-entropy, connected components",
        )
    ]
