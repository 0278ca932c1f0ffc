"""The ``two_class`` segmentation head: background / foreground, split by a seeded watershed.

The network only learns foreground versus background (no border class), which is the
simpler task when annotations are few. Touching objects are separated afterwards from
the shape of the foreground instead of a learned border:

1. foreground = foreground probability above the threshold;
2. the Euclidean distance transform of the foreground (``scipy.ndimage``) is high in
   object centres and falls to zero at the background and at the narrow necks where two
   roughly convex objects touch;
3. its maxima that rise at least ``split_depth`` pixels above the saddle to any higher
   maximum (``skimage.morphology.h_maxima``; a flat ridge counts as one maximum) seed a
   watershed on the negated distance (``skimage.segmentation.watershed``) restricted to the
   foreground, so each seed grows into one object and two touching discs split at their
   neck. A connected foreground component without a seed (an object thinner than
   ``2 * split_depth``) keeps its own label.

Why distance + watershed rather than erosion: erosion needs an object-size-dependent
number of iterations and loses small objects, while the distance transform adapts to each
object's size. Its limit: a neck must be clearly narrower than the objects it joins, and
non-convex objects can be over-split; raise ``split_depth`` (or use the ``three_class``
head, which learns borders) for those.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import relabel_sequential, watershed
from torch import nn

from denoiseg_core.components import ComponentParams, HeadSpec
from denoiseg_core.hookspecs import hookimpl
from denoiseg_core.losses import labelled_weighted_cross_entropy

BACKGROUND, FOREGROUND = 0, 1


class TwoClassParams(ComponentParams):
    """Parameters of the ``two_class`` head."""

    class_weights: tuple[float, float] = Field(
        (1.0, 1.0), description="cross-entropy weights of background, foreground"
    )
    split_depth: float = Field(
        2.0, gt=0, description="how much (pixels) a neck must be thinner than both objects it joins to split them"
    )
    split_touching: bool = Field(True, description="split touching objects by a distance-transform watershed")
    min_size: int = Field(0, ge=0, description="remove instances smaller than this many pixels")


class TwoClassHead:
    """Implements :class:`denoiseg_core.components.SegmentationHead` for 2D and 3D."""

    num_classes = 2
    channel_names = ("background", "foreground")
    threshold_candidates = tuple(float(t) for t in np.round(np.arange(0.1, 0.95, 0.05), 2))

    def __init__(self, params: TwoClassParams | None = None):
        self.params = params or TwoClassParams()

    def targets(self, labels: np.ndarray) -> np.ndarray:
        """Instance labels -> class indices (0 background, 1 foreground), int64."""
        return (np.asarray(labels) > 0).astype(np.int64)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """Class-weighted cross-entropy, the mean over all pixels of labelled patches."""
        return labelled_weighted_cross_entropy(logits, targets, labelled, self.params.class_weights)

    def activation(self) -> nn.Module:
        return nn.Softmax(dim=1)

    def instances(self, probabilities: np.ndarray, threshold: float) -> np.ndarray:
        """Class probabilities ``(2, *spatial)`` of one image -> int32 instance labels."""
        probabilities = np.asarray(probabilities)
        if probabilities.ndim < 3 or probabilities.shape[0] != self.num_classes:
            raise ValueError(f"expected probabilities (2, *spatial), got shape {probabilities.shape}")
        foreground = probabilities[FOREGROUND] > threshold
        components, n_components = ndimage.label(foreground)
        if self.params.split_touching and n_components > 0:
            labels = self._split(foreground, components, n_components)
        else:
            labels = components
        if self.params.min_size > 0 and labels.max() > 0:
            sizes = np.bincount(labels.ravel())
            small = sizes < self.params.min_size
            small[0] = False
            labels[small[labels]] = 0
        return relabel_sequential(labels)[0].astype(np.int32)

    def _split(self, foreground: np.ndarray, components: np.ndarray, n_components: int) -> np.ndarray:
        distance = ndimage.distance_transform_edt(foreground)
        markers, n_seeds = ndimage.label(h_maxima(distance, self.params.split_depth))
        # Components without a seed (too thin for a maximum of depth split_depth) stay whole.
        seeded = np.zeros(n_components + 1, dtype=bool)
        seeded[components[markers > 0]] = True
        unseeded = ~seeded[components] & foreground
        markers[unseeded] = components[unseeded] + n_seeds
        return watershed(-distance, markers, mask=foreground)


def build_two_class(params: TwoClassParams) -> TwoClassHead:
    return TwoClassHead(params)


@hookimpl
def denoiseg_register_heads() -> list[HeadSpec]:
    return [
        HeadSpec(
            name="two_class",
            params=TwoClassParams,
            build=build_two_class,
            description="background / foreground, weighted cross-entropy, distance watershed splits touching objects",
        )
    ]
