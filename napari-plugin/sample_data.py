"""Sample data for napari's File > Open Sample: the demo's synthetic noisy nuclei, made on the fly."""

from __future__ import annotations

import numpy as np

from denoiseg_core.synthetic import make_nuclei_image

#: images in the sample stack, and how many of them come with painted nuclei
SAMPLE_IMAGES = 8
SAMPLE_PAINTED = 3
SAMPLE_SHAPE = (128, 128)


def noisy_nuclei_stack(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(noisy (S, Y, X) float32, annotations (S, Y, X) int32)``; only the first
    :data:`SAMPLE_PAINTED` slices are painted, the others are unlabelled (zero)."""
    noisy, annotations = [], []
    for index in range(SAMPLE_IMAGES):
        # the same per-image streams as the demo's training images
        _, image, labels = make_nuclei_image(SAMPLE_SHAPE, np.random.default_rng([seed, 0, index]))
        noisy.append(image)
        annotations.append(labels if index < SAMPLE_PAINTED else np.zeros_like(labels))
    return np.stack(noisy), np.stack(annotations).astype(np.int32)


def noisy_nuclei() -> list[tuple]:
    """The npe2 sample-data command: an image layer and a Labels layer to train on."""
    noisy, annotations = noisy_nuclei_stack()
    return [
        (noisy, {"name": "noisy nuclei"}, "image"),
        (annotations, {"name": "annotations"}, "labels"),
    ]
