"""Prediction for the viewer: a run (checkpoint) or a bioimage.io package on a layer.

Runs go through :func:`denoiseg_core.prediction.predict_array` with the same tiling as
``denoiseg predict`` (whole for small images, device-sized tiles for large ones), counting
tiles for the progress bar. Packages go through ``denoiseg_zoo.runtime`` (bioimageio.core's
tiled pipeline, as ``denoiseg zoo predict``). Instances always come from the stored
probabilities, so a new threshold needs no new network pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from denoiseg_core.errors import DataError, DenoiSegError
from denoiseg_core.evaluation import instance_labels, instance_settings
from denoiseg_core.prediction import choose_tile, predict_array, tile_plan
from denoiseg_core.runtime import resolve_device

from denoiseg_napari.layer_data import split_images, spatial_ndim, stack_like

#: progress callback: (finished units, total units)
Progress = Callable[[int, int], None]


@dataclass
class LayerPrediction:
    """A layer's results, with the layer's axes (``probabilities`` has the classes first)."""

    denoised: np.ndarray | None
    probabilities: np.ndarray | None
    labels: np.ndarray | None
    threshold: float | None
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # packages not made by denoiseg


class _CountingNet(nn.Module):
    """Calls ``on_batch(n_tiles)`` after every forward pass (predict_array runs tiles in batches)."""

    def __init__(self, net: nn.Module, on_batch: Callable[[int], None]):
        super().__init__()
        self.net = net
        self.on_batch = on_batch  # a plain function: predict_array deep-copies the module

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        outputs = self.net(inputs)
        self.on_batch(int(inputs.shape[0]))
        return outputs


class RunPredictor:
    """A denoiseg checkpoint: a run folder or a ``.pt`` file. A run folder segments with its
    ``best.pt`` and denoises with its ``best_denoising.pt`` when there is one, as ``denoiseg predict``."""

    def __init__(self, source: Path, tile: Sequence[int] | None = None):
        """``tile``: tile size; None tiles as ``denoiseg predict`` does (whole up to 1024x1024
        pixels, device-sized tiles above)."""
        from denoiseg_core.checkpoint import load_checkpoint, run_denoiser_path

        self.tile = tile

        source = Path(source)
        checkpoint = source / "best.pt" if source.is_dir() else source
        if source.is_dir() and not checkpoint.is_file():
            raise DenoiSegError("no best.pt in the run folder (has an epoch finished?)", source)
        self.model = load_checkpoint(checkpoint)
        denoiser = run_denoiser_path(source)
        self.denoiser = None if denoiser is None else load_checkpoint(denoiser)
        self.ndim = self.model.ndim
        self.settings = instance_settings(self.model)
        self.threshold = self.settings.primary_threshold
        if self.model.in_channels != 1:
            raise DenoiSegError(f"the model expects {self.model.in_channels} channels; the viewer widget predicts single-channel layers", source)

    def tiles(self, spatial: Sequence[int]) -> int:
        built = self.model.built
        tile = choose_tile(self.tile, spatial, built.size_divisor, built.halo, device=resolve_device("auto"))
        passes = 1 if self.denoiser is None else 2
        return passes * len(tile_plan(spatial, tile, built.halo, built.size_divisor))

    def predict(self, image: np.ndarray, on_tiles: Callable[[int], None]) -> tuple[np.ndarray, np.ndarray]:
        """``(denoised (*spatial), probabilities (K, *spatial))`` of one single-channel image."""
        output = self._outputs(self.model, image, on_tiles)
        denoised = output if self.denoiser is None else self._outputs(self.denoiser, image, on_tiles)
        return denoised[0], output[1:]

    def _outputs(self, model, image: np.ndarray, on_tiles: Callable[[int], None]) -> np.ndarray:
        """``model``'s output channels for ``image``, the denoised one de-normalised."""
        built = model.built
        tile = choose_tile(self.tile, image.shape, built.size_divisor, built.halo, device=resolve_device("auto"))
        output = predict_array(
            _CountingNet(model.inference_net(), on_tiles).eval(),
            np.asarray(image)[None],
            divisor=built.size_divisor,
            halo=built.halo,
            tile=tile,
            device=resolve_device("auto"),  # the GPU when there is one, as `denoiseg predict`
            precision="auto",
            out_channels=1 + built.head.num_classes,
            normalization=model.normalization,
        )
        output[:1] = model.normalization.denormalize(output[:1])
        return output

    def instances(self, probabilities: np.ndarray, threshold: float) -> np.ndarray:
        return instance_labels(self.model.head, probabilities, self.settings.with_threshold(threshold))


class PackagePredictor:
    """A bioimage.io package with one input (denoiseg's give denoised, probabilities and labels)."""

    def __init__(self, source: Path):
        from denoiseg_zoo.runtime import create_pipeline, denoiseg_section, input_layout, load_runnable

        self.source = Path(source)
        self.descr = load_runnable(self.source)
        self.ndim = len(input_layout(self.descr).spatial_ids)
        self.section: dict[str, Any] | None = denoiseg_section(self.descr)
        self.head = self.settings = self.threshold = None
        if self.section:
            from denoiseg_zoo.runtime import package_head

            self.head, self.settings = package_head(self.section)
            self.threshold = self.settings.primary_threshold
        self.pipeline = create_pipeline(self.descr)

    def tiles(self, spatial: Sequence[int]) -> int:
        return 1  # bioimageio.core tiles internally without reporting; progress counts images

    def predict(self, image: np.ndarray, on_tiles: Callable[[int], None]) -> dict[str, np.ndarray]:
        from denoiseg_zoo.runtime import predict_package

        outputs = predict_package(self.descr, image, self.source, pipeline=self.pipeline)
        on_tiles(1)
        return outputs

    def instances(self, probabilities: np.ndarray, threshold: float) -> np.ndarray:
        """Instances with the package's settings, the head's primary threshold set to ``threshold``."""
        assert self.head is not None
        return instance_labels(self.head, probabilities, self.settings.with_threshold(threshold))

    def close(self) -> None:
        self.pipeline.unload()


def load_predictor(source: Path) -> RunPredictor | PackagePredictor:
    source = Path(source)
    if not source.exists():
        raise DataError("not found (choose a run folder, a .pt checkpoint or a bioimage.io .zip)", source)
    if source.suffix.lower() == ".zip":
        return PackagePredictor(source)
    return RunPredictor(source)


def predict_layer(
    predictor: RunPredictor | PackagePredictor, name: str, data: np.ndarray, axes: str, progress: Progress
) -> LayerPrediction:
    """Predict every image (slice) of a layer; ``progress`` counts tiles over the whole layer."""
    if spatial_ndim(axes) != predictor.ndim:
        raise DataError(f"layer {name!r} has {spatial_ndim(axes)}-D images (axes {axes}) but the model is {predictor.ndim}-D")
    images = split_images(name, data, axes)
    total = sum(predictor.tiles(image.shape) for image in images)
    done = 0

    def on_tiles(count: int) -> None:
        nonlocal done
        done += count
        progress(min(done, total), total)

    progress(0, total)
    if isinstance(predictor, RunPredictor):
        results = [predictor.predict(image, on_tiles) for image in images]
        probabilities = [p for _, p in results]
        labels = [predictor.instances(p, predictor.threshold) for p in probabilities]
        return LayerPrediction(
            denoised=stack_like([d for d, _ in results], axes),
            probabilities=np.stack([stack_like([p[k] for p in probabilities], axes) for k in range(probabilities[0].shape[0])]),
            labels=stack_like(labels, axes),
            threshold=predictor.threshold,
        )
    outputs = [predictor.predict(image, on_tiles) for image in images]
    section = predictor.section
    if section is None:  # any other package: its outputs as they are
        return LayerPrediction(None, None, None, None, {key: stack_like([o[key] for o in outputs], axes) for key in outputs[0]})
    denoised_channels = section["output_channels"]["denoised"]
    probability_channels = section["output_channels"]["probabilities"]
    arrays = [next(iter(o.values())) for o in outputs]
    probabilities = [a[probability_channels] for a in arrays]
    return LayerPrediction(
        denoised=stack_like([a[denoised_channels][0] for a in arrays], axes),
        probabilities=np.stack([stack_like([p[k] for p in probabilities], axes) for k in range(probabilities[0].shape[0])]),
        labels=stack_like([predictor.instances(p, predictor.threshold) for p in probabilities], axes),
        threshold=predictor.threshold,
    )


def relabel(
    predictor: RunPredictor | PackagePredictor, probabilities: np.ndarray, axes: str, threshold: float
) -> np.ndarray:
    """Instance labels of a whole layer at ``threshold`` from its stored ``(K, ...)`` probabilities."""
    if axes.startswith("S"):
        return np.stack([predictor.instances(probabilities[:, i], threshold) for i in range(probabilities.shape[1])])
    return predictor.instances(probabilities, threshold)
