"""Cover images from real predictions: raw | denoised | segmentation overlay."""

from __future__ import annotations

import io

import numpy as np


def _display_plane(image: np.ndarray) -> np.ndarray:
    """First channel, middle z plane of a ``(C, *spatial)`` array, as float."""
    plane = np.asarray(image[0], dtype=np.float32)
    while plane.ndim > 2:
        plane = plane[plane.shape[0] // 2]
    return plane


def _display_labels(labels: np.ndarray) -> np.ndarray:
    plane = np.asarray(labels)
    while plane.ndim > 2:
        plane = plane[plane.shape[0] // 2]
    return plane


def _stretch(plane: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((plane - low) / max(high - low, 1e-12), 0.0, 1.0)


def overlay_rgb(raw_plane: np.ndarray, labels: np.ndarray, low: float, high: float, alpha: float = 0.45) -> np.ndarray:
    """Grey raw image with each instance tinted in its own colour and its outline drawn."""
    from matplotlib import colormaps
    from skimage.segmentation import find_boundaries

    grey = _stretch(raw_plane, low, high)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if labels.max() > 0:
        palette = colormaps["tab20"](np.arange(20))[:, :3]
        colours = palette[(labels - 1) % 20]
        inside = labels > 0
        rgb[inside] = (1 - alpha) * rgb[inside] + alpha * colours[inside]
        outline = find_boundaries(labels, mode="inner")
        rgb[outline] = colours[outline]
    return rgb


def cover_png(raw: np.ndarray, denoised: np.ndarray, labels: np.ndarray, title: str = "") -> bytes:
    """A 2:1 PNG with three panels: raw input, denoised output, instance overlay.

    ``raw`` and ``denoised`` are ``(C, *spatial)``, ``labels`` ``(*spatial)``; 3D images
    show their middle plane. Raw and denoised share one intensity range so they compare.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    raw_plane, denoised_plane, label_plane = _display_plane(raw), _display_plane(denoised), _display_labels(labels)
    low, high = (float(v) for v in np.percentile(raw_plane, [1, 99.8]))
    figure = Figure(figsize=(8, 4), dpi=100)
    axes = figure.subplots(1, 3)
    panels = [
        ("raw", _stretch(raw_plane, low, high)),
        ("denoised", _stretch(denoised_plane, low, high)),
        (f"segmentation ({int(len(np.unique(label_plane)) - (label_plane.min() == 0))} objects)", None),
    ]
    for ax, (name, image) in zip(axes, panels):
        if image is None:
            ax.imshow(overlay_rgb(raw_plane, label_plane, low, high), interpolation="nearest")
        else:
            ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    if title:
        figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
