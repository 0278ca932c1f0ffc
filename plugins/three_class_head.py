"""The built-in ``three_class`` segmentation head (DenoiSeg): background, foreground, border.

Training targets mark object borders (``skimage.segmentation.find_boundaries``) as a
third class so touching objects are separated; instances are the connected components
of the thresholded foreground probability, optionally grown back into the predicted
border they lost to it. The same instances in Fiji: ``three_class_instances.ijm``, which an
exported package carries as its deepImageJ postprocessing.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Literal

import numpy as np
from pydantic import Field
from scipy import ndimage
from skimage.segmentation import expand_labels, find_boundaries

from denoiseg_core.components import ComponentParams, HeadSpec
from denoiseg_core.hookspecs import hookimpl
from denoiseg_plugins.class_heads import ClassHead, ForegroundThreshold

BACKGROUND, FOREGROUND, BORDER = 0, 1, 2
#: the ImageJ macro that computes the same instances in Fiji (deepImageJ postprocessing)
MACRO_FILE = "three_class_instances.ijm"


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


class ThreeClassHead(ClassHead):
    """Implements :class:`denoiseg_core.components.SegmentationHead` for 2D and 3D."""

    classes = (
        ("background", "probability of background"),
        ("foreground", "probability of an object's inside"),
        ("border", "probability of an object's border (between touching objects too)"),
    )

    def __init__(self, params: ThreeClassParams | None = None):
        super().__init__(params or ThreeClassParams())

    def targets(self, labels: np.ndarray) -> np.ndarray:
        """Instance labels -> class indices (0 background, 1 foreground, 2 border), int64."""
        labels = np.asarray(labels)
        border = find_boundaries(labels, mode=self.params.border_mode)
        out = np.full(labels.shape, BACKGROUND, dtype=np.int64)
        out[(labels > 0) & ~border] = FOREGROUND
        out[border] = BORDER
        return out

    def instances(self, probabilities: np.ndarray, settings: ForegroundThreshold) -> np.ndarray:
        """Class probabilities ``(3, *spatial)`` of one image -> int32 instance labels."""
        probabilities = self._check_shape(probabilities)
        foreground = probabilities[FOREGROUND] > settings.threshold
        labels, _ = ndimage.label(foreground)  # default cross structure: touching diagonals stay apart
        if self.params.grow_into_border:
            labels = self._grow_into_border(labels, probabilities, foreground)
        return self._remove_small(labels)

    def instances_text(self, settings: ForegroundThreshold) -> str:
        grown = ", each grown into the adjacent predicted border that separates touching objects" if self.params.grow_into_border else ""
        small = f"; instances under {self.params.min_size} pixels are dropped" if self.params.min_size else ""
        return (
            f"foreground probability > **{settings.threshold:.3g}**, connected components (4-connected in 2D, "
            f"6-connected in 3D){grown}{small}."
        )

    def imagej_macro(self, settings: ForegroundThreshold, denoised_channels: int) -> str:
        """The packaged macro (``three_class_instances.ijm``) with these settings written into its settings block."""
        template = resources.files("denoiseg_plugins").joinpath(MACRO_FILE).read_text(encoding="utf-8")
        values = {
            "threshold": f"{settings.threshold:.9g}",
            "denoisedChannels": str(denoised_channels),
            "growIntoBorder": "1" if self.params.grow_into_border else "0",
            "outerBorder": "1" if self.params.border_mode == "outer" else "0",
            "minSize": str(self.params.min_size),
        }
        for key, value in values.items():
            template, count = re.subn(rf"(?m)^{key} = .*;$", f"{key} = {value};", template, count=1)
            if count != 1:
                raise RuntimeError(f"macro template lacks the setting {key}")
        return template

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
