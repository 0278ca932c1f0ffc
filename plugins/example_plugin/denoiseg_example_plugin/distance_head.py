"""The ``distance_map`` head: a foreground probability and a normalised distance map, split by
a seeded watershed (a small StarDist-like head, shown as a third-party plugin).

Targets are float32 ``(2, *spatial)``: channel 0 is 1 inside objects, channel 1 each
object pixel's Euclidean distance to the nearest pixel outside its object (touching objects
included, ``scipy.ndimage.distance_transform_edt``), divided by the object's largest one, so
every object peaks at 1 in its centre whatever its size. Both channels are learnt with
binary cross-entropy (the distance as a soft target) through a sigmoid.

Instances need two thresholds: foreground is where the probability exceeds
``probability_threshold``; seeds are the connected regions of foreground whose distance
exceeds ``seed_threshold`` (object centres, apart even where objects touch); a watershed
on the negated distance (``skimage.segmentation.watershed``) grows each seed through the
foreground. Foreground that no seed reaches keeps its own connected component.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import product

import numpy as np
import torch
from pydantic import Field
from scipy import ndimage
from skimage.segmentation import relabel_sequential, watershed
from torch import nn
from torch.nn import functional as F

from denoiseg_core.components import (
    ComponentParams,
    HeadOutputs,
    HeadSpec,
    InstanceSettings,
    OutputChannel,
    TargetSpec,
)
from denoiseg_core.metrics import Tuning, tune_by_grid

PROBABILITY, DISTANCE = 0, 1


class DistanceMapParams(ComponentParams):
    """Parameters of the ``distance_map`` head."""

    distance_weight: float = Field(1.0, ge=0, description="weight of the distance term against the foreground term")


class DistanceMapSettings(InstanceSettings):
    """The two thresholds of the ``distance_map`` head; ``--threshold`` sets the probability one."""

    primary = "probability_threshold"

    probability_threshold: float = Field(0.5, gt=0, lt=1, description="a pixel is foreground where its probability is above this")
    seed_threshold: float = Field(
        0.5, gt=0, lt=1, description="object centres (watershed seeds) are foreground whose normalised distance is above this"
    )


#: the grid ``tune`` searches (``quick``: every other value of each)
PROBABILITY_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
SEED_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


class DistanceMapHead:
    """Implements :class:`denoiseg_core.components.SegmentationHead` for 2D and 3D."""

    num_classes = 2
    target = TargetSpec("float32", channels=2)
    settings = DistanceMapSettings

    def __init__(self, params: DistanceMapParams | None = None):
        self.params = params or DistanceMapParams()

    def targets(self, labels: np.ndarray) -> np.ndarray:
        """Instance labels -> float32 ``(2, *spatial)``: foreground, normalised distance to the object's edge."""
        labels = np.asarray(labels)
        distance = np.zeros(labels.shape, dtype=np.float32)
        for index, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None:
                continue
            # one pixel of margin: the object's edge inside its bounding box is an edge too
            padded = np.pad(labels[box] == index, 1)
            inside = ndimage.distance_transform_edt(padded)[(slice(1, -1),) * labels.ndim]
            own = labels[box] == index
            distance[box][own] = (inside[own] / inside.max()).astype(np.float32)
        return np.stack([(labels > 0).astype(np.float32), distance])

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy of both channels, the mean over all pixels of labelled patches."""
        targets = targets.to(device=logits.device, dtype=torch.float32)
        keep = labelled.to(device=logits.device, dtype=torch.float32).view(-1, *([1] * (logits.ndim - 1)))
        # targets of unlabelled patches may hold anything: replaced before they reach the loss
        safe = torch.where(keep > 0, targets, torch.zeros_like(targets))
        per_pixel = F.binary_cross_entropy_with_logits(logits.float(), safe, reduction="none")
        weights = torch.tensor([1.0, self.params.distance_weight], device=logits.device).view(1, 2, *([1] * (logits.ndim - 2)))
        kept = (per_pixel * weights * keep).sum()
        pixels = (keep.expand_as(per_pixel[:, :1])).sum().clamp(min=1.0)
        return kept / pixels

    def activation(self) -> nn.Module:
        return nn.Sigmoid()

    def instances(self, outputs: np.ndarray, settings: DistanceMapSettings) -> np.ndarray:
        """Outputs ``(2, *spatial)`` (probability, normalised distance) -> int32 instance labels."""
        outputs = np.asarray(outputs)
        if outputs.ndim < 3 or outputs.shape[0] != 2:
            raise ValueError(f"expected outputs (2, *spatial), got shape {outputs.shape}")
        foreground = outputs[PROBABILITY] > settings.probability_threshold
        distance = outputs[DISTANCE]
        seeds, n_seeds = ndimage.label(foreground & (distance > settings.seed_threshold))
        components, _ = ndimage.label(foreground)
        unseeded = foreground & ~np.isin(components, np.unique(components[seeds > 0]))
        seeds[unseeded] = components[unseeded] + n_seeds
        labels = watershed(-distance, seeds, mask=foreground)
        return relabel_sequential(labels)[0].astype(np.int32)

    def tune(self, outputs: Sequence[np.ndarray], labels: Sequence[np.ndarray], *, quick: bool = False) -> Tuning:
        """Both thresholds on a grid, the pair with the best mean AP@0.5."""
        step = 2 if quick else 1
        candidates = [
            DistanceMapSettings(probability_threshold=p, seed_threshold=s)
            for p, s in product(PROBABILITY_THRESHOLDS[::step], SEED_THRESHOLDS[::step])
        ]
        return tune_by_grid(self, candidates, outputs, labels)

    def outputs(self) -> HeadOutputs:
        return HeadOutputs(
            channels=(
                OutputChannel("foreground", "probability", "probability of an object"),
                OutputChannel("distance", "distance", "distance to the object's edge divided by the object's largest one"),
            ),
            activation_code="torch.sigmoid(segmentation)",
            summary="foreground probability and normalised distance to the object's edge (both through a sigmoid)",
        )

    def instances_text(self, settings: DistanceMapSettings) -> str:
        return (
            f"foreground probability > **{settings.probability_threshold:.3g}**; object centres where the "
            f"normalised distance is > **{settings.seed_threshold:.3g}** seed a watershed of the negated "
            "distance within the foreground (`skimage.segmentation.watershed`); foreground no seed reaches "
            "keeps its own connected component."
        )

    def imagej_macro(self, settings: DistanceMapSettings, denoised_channels: int) -> None:
        return None  # no macro: `denoiseg zoo predict` computes the instances


def build_distance_map(params: DistanceMapParams) -> DistanceMapHead:
    return DistanceMapHead(params)


DISTANCE_MAP = HeadSpec(
    name="distance_map",
    params=DistanceMapParams,
    build=build_distance_map,
    description="foreground probability + normalised distance map (float targets), two-threshold seeded watershed",
)
