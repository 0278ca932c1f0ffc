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
from pydantic import Field
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from denoiseg_core.components import ComponentParams, HeadSpec
from denoiseg_core.hookspecs import hookimpl
from denoiseg_plugins.class_heads import FOREGROUND, ClassHead, ForegroundThreshold


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


class TwoClassHead(ClassHead):
    """Implements :class:`denoiseg_core.components.SegmentationHead` for 2D and 3D."""

    classes = (("background", "probability of background"), ("foreground", "probability of an object"))

    def __init__(self, params: TwoClassParams | None = None):
        super().__init__(params or TwoClassParams())

    def targets(self, labels: np.ndarray) -> np.ndarray:
        """Instance labels -> class indices (0 background, 1 foreground), int64."""
        return (np.asarray(labels) > 0).astype(np.int64)

    def instances(self, probabilities: np.ndarray, settings: ForegroundThreshold) -> np.ndarray:
        """Class probabilities ``(2, *spatial)`` of one image -> int32 instance labels."""
        probabilities = self._check_shape(probabilities)
        foreground = probabilities[FOREGROUND] > settings.threshold
        components, n_components = ndimage.label(foreground)
        if self.params.split_touching and n_components > 0:
            labels = self._split(foreground, components, n_components)
        else:
            labels = components
        return self._remove_small(labels)

    def instances_text(self, settings: ForegroundThreshold) -> str:
        split = (
            f", touching objects split by a watershed of the foreground's distance transform seeded at "
            f"its maxima at least {self.params.split_depth:g} pixels deep"
            if self.params.split_touching
            else ""
        )
        small = f"; instances under {self.params.min_size} pixels are dropped" if self.params.min_size else ""
        return (
            f"foreground probability > **{settings.threshold:.3g}**, connected components (4-connected in 2D, "
            f"6-connected in 3D){split}{small}."
        )

    def imagej_macro(self, settings: ForegroundThreshold, denoised_channels: int) -> None:
        return None  # the seeded watershed has no ImageJ macro; `denoiseg zoo predict` computes it

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
