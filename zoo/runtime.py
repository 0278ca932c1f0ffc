"""Running packages: ``denoiseg zoo test`` and ``denoiseg zoo predict``.

Prediction goes through bioimageio.core's prediction pipeline with tiling, the way
ilastik and other consumers run a package: the input is padded at its end to a size the
package accepts, cut into blocks of ``min + n * step`` pixels (each with the output halo
added on both sides), and the halo of every block's output is discarded. For denoiseg
packages the tile starts then lie on the network's pooling grid (export rounds the halo
to the size divisor), so tiled outputs equal whole-image inference away from the borders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from denoiseg_core.errors import DataError, DenoiSegError

from denoiseg_zoo.archive import PackageError, check_package_zip, load_package

#: default largest block edge (pixels) for tiled prediction
DEFAULT_TILE = 512


def denoiseg_section(descr: Any) -> dict | None:
    """``config.denoiseg`` of a package made by denoiseg, else None."""
    from denoiseg_zoo.export import PACKAGE_FORMAT

    extra = descr.config.model_extra or {}
    section = extra.get("denoiseg")
    if isinstance(section, dict) and section.get("format") == PACKAGE_FORMAT:
        return section
    return None


def test_package(path: Path):
    """``bioimageio.core.test_model`` on a package (every weight format), after the safety checks."""
    from bioimageio.core import test_model

    check_package_zip(Path(path))
    return test_model(Path(path), devices=["cpu"])


def format_summary(summary: Any) -> str:
    """A compact, readable version of a test summary (one line per check)."""
    lines = [f"status: {summary.status}"]
    for detail in summary.details:
        mark = {"passed": "ok", "failed": "FAILED", "valid-format": "ok"}.get(detail.status, detail.status)
        lines.append(f"  [{mark}] {detail.name}")
        for error in detail.errors:
            location = ".".join(str(p) for p in error.loc)
            lines.append(f"      error{' at ' + location if location else ''}: {' '.join(str(error.msg).split())[:400]}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- prediction


@dataclass
class InputLayout:
    """How an image maps onto a package's single input tensor."""

    axis_ids: list[str]  # every axis of the input, in order
    channel_count: int | None  # None: no channel axis
    spatial_ids: list[str]


def input_layout(descr: Any) -> InputLayout:
    from bioimageio.spec.model.v0_5 import BatchAxis, ChannelAxis, SpaceInputAxis

    if len(descr.inputs) != 1:
        raise DenoiSegError(f"package {descr.name!r} has {len(descr.inputs)} inputs; zoo predict runs models with one input")
    ids, channels, spatial = [], None, []
    for axis in descr.inputs[0].axes:
        ids.append(str(axis.id))
        if isinstance(axis, ChannelAxis):
            channels = len(axis.channel_names)
        elif isinstance(axis, SpaceInputAxis):
            spatial.append(str(axis.id))
        elif not isinstance(axis, BatchAxis):
            raise DenoiSegError(f"package {descr.name!r}: input axis {axis.id!r} ({axis.type}) is not supported by zoo predict")
    return InputLayout(ids, channels, spatial)


def arrange_input(image: np.ndarray, layout: InputLayout, path: Path) -> np.ndarray:
    """An image (spatial axes, optionally a channel axis first or last) in the input's axis order."""
    image = np.asarray(image)
    n_space = len(layout.spatial_ids)
    if layout.channel_count is None:
        if image.ndim != n_space:
            raise DataError(f"image of shape {image.shape} does not fit the model's {n_space}-D input", path)
        channel_first = image[None]
    elif image.ndim == n_space and layout.channel_count == 1:
        channel_first = image[None]
    elif image.ndim == n_space + 1 and image.shape[0] == layout.channel_count:
        channel_first = image
    elif image.ndim == n_space + 1 and image.shape[-1] == layout.channel_count:
        channel_first = np.moveaxis(image, -1, 0)
    else:
        raise DataError(
            f"image of shape {image.shape} does not fit the model input ({layout.channel_count or 1} channel(s), {n_space}-D)",
            path,
        )
    # channel_first is (C, *spatial); place it in the description's axis order
    source_axes = ["channel", *layout.spatial_ids]
    arranged = []
    for axis_id in layout.axis_ids:
        if axis_id == "batch":
            continue
        key = "channel" if axis_id not in layout.spatial_ids else axis_id
        arranged.append(source_axes.index(key))
    array = np.transpose(channel_first, arranged)
    if layout.channel_count is None:
        array = array[0]
    if "batch" in layout.axis_ids:
        array = np.expand_dims(array, layout.axis_ids.index("batch"))
    return array


def _padded_sizes(descr: Any, layout: InputLayout, shape: dict[str, int]) -> dict[str, int]:
    """The smallest accepted size >= the image's size for every spatial axis."""
    from bioimageio.spec.model.v0_5 import ParameterizedSize

    sizes = {}
    for axis in descr.inputs[0].axes:
        axis_id = str(axis.id)
        if axis_id not in layout.spatial_ids:
            continue
        size = shape[axis_id]
        if isinstance(axis.size, ParameterizedSize):
            sizes[axis_id] = axis.size.get_size(max(0, axis.size.get_n(size)))
        elif isinstance(axis.size, int):
            sizes[axis_id] = max(size, axis.size)
        else:
            sizes[axis_id] = size
    return sizes


def predict_package(descr: Any, image: np.ndarray, path: Path, *, tile: int = DEFAULT_TILE, pipeline: Any = None) -> dict[str, np.ndarray]:
    """Run a package on one image with tiling; ``{output id: array in the output's axis order
    without the batch axis}``, cropped back to the image's size."""
    from bioimageio.core import Sample, Tensor
    from bioimageio.spec.model.v0_5 import ParameterizedSize

    layout = input_layout(descr)
    array = arrange_input(image, layout, path).astype(np.float32)
    input_id = descr.inputs[0].id
    original = {axis_id: array.shape[layout.axis_ids.index(axis_id)] for axis_id in layout.spatial_ids}
    padded = _padded_sizes(descr, layout, original)
    pad_width = [(0, 0)] * array.ndim
    for axis_id, size in padded.items():
        pad_width[layout.axis_ids.index(axis_id)] = (0, size - original[axis_id])
    # symmetric padding keeps image statistics at the edge and works for any pad width
    array = np.pad(array, pad_width, mode="symmetric")

    ns = {}
    for axis in descr.inputs[0].axes:
        if isinstance(axis.size, ParameterizedSize):
            largest = (padded[str(axis.id)] - axis.size.min) // axis.size.step
            wanted = max(0, (int(tile) - axis.size.min) // axis.size.step)
            ns[(input_id, axis.id)] = max(0, min(largest, wanted))
    sample = Sample(members={input_id: Tensor.from_numpy(array, dims=tuple(layout.axis_ids))}, stat={}, id=Path(path).stem)
    own_pipeline = pipeline is None
    pipeline = pipeline or create_pipeline(descr)
    try:
        if ns:
            result = pipeline.predict_sample_with_blocking(sample, ns=ns)
        else:
            result = pipeline.predict_sample_without_blocking(sample)
    finally:
        if own_pipeline:
            pipeline.unload()
    outputs = {}
    for output in descr.outputs:
        tensor = result.members[output.id]
        dims = [str(d) for d in tensor.dims]
        data = tensor.data.to_numpy()
        crop = tuple(slice(0, original[d]) if d in original else slice(None) for d in dims)
        data = data[crop]
        if "batch" in dims:
            data = np.take(data, 0, axis=dims.index("batch"))
        outputs[str(output.id)] = data
    return outputs


#: weight formats ``zoo predict`` prefers: the ones that run without executing Python code
#: shipped in the package come first
WEIGHT_FORMAT_PREFERENCE = ("torchscript", "onnx", "pytorch_state_dict")


def preferred_weight_format(descr: Any) -> str | None:
    """TorchScript, else ONNX, else the state dict (whose architecture source is Python code
    from the package); None lets bioimageio.core choose among other formats."""
    available = set(descr.weights.available_formats)
    return next((fmt for fmt in WEIGHT_FORMAT_PREFERENCE if fmt in available), None)


def create_pipeline(descr: Any):
    """bioimageio.core's prediction pipeline for a package, with the preferred weights."""
    from bioimageio.core import create_prediction_pipeline

    return create_prediction_pipeline(descr, weight_format=preferred_weight_format(descr))


def denoiseg_instances(section: dict, output: np.ndarray) -> np.ndarray:
    """Instance labels from a denoiseg package's output (C, *spatial) with its head and threshold."""
    from denoiseg_core.plugin_manager import get_registry

    head_info = section["head"]
    spec = get_registry().spec("head", head_info["name"])
    head = spec.build(spec.params.model_validate(head_info.get("params") or {}))
    probabilities = output[section["output_channels"]["probabilities"]]
    return head.instances(probabilities, float(section["threshold"]))


def output_paths(descr: Any, inputs: Sequence[Path], out_dir: Path) -> dict[Path, list[tuple[str, Path]]]:
    """Where each input's results go: ``{input: [(kind, path), ...]}``."""
    section = denoiseg_section(descr)
    kinds = ["denoised", "probabilities", "labels"] if section else [str(o.id) for o in descr.outputs]
    return {Path(p): [(kind, out_dir / f"{Path(p).stem}_{kind}.tif") for kind in kinds] for p in inputs}


def load_runnable(path: Path):
    """The validated description of a package that ``zoo predict`` can run."""
    descr = load_package(Path(path))
    input_layout(descr)  # one input with supported axes
    return descr


def write_prediction(
    descr: Any, outputs: dict[str, np.ndarray], targets: list[tuple[str, Path]], inputs: Sequence[Path], overwrite: bool
) -> None:
    """Write one image's results (denoised/probabilities/labels for denoiseg packages)."""
    from denoiseg_core.io import write_tiff

    section = denoiseg_section(descr)
    if section:
        output = next(iter(outputs.values()))
        denoised = output[section["output_channels"]["denoised"]]
        data = {
            "denoised": denoised[0] if denoised.shape[0] == 1 else denoised,
            "probabilities": output[section["output_channels"]["probabilities"]],
        }
        labels = denoiseg_instances(section, output)
        data["labels"] = labels.astype(np.uint16 if labels.max() < 2**16 else np.int32)
    else:
        data = outputs
    for kind, target in targets:
        array = data[kind]
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        write_tiff(target, array, overwrite=overwrite, inputs=tuple(inputs))


def check_targets(targets: dict[Path, list[tuple[str, Path]]], overwrite: bool) -> None:
    """Refuse before any work if an output exists (without --overwrite) or is an input."""
    inputs = {p.resolve() for p in targets}
    for entries in targets.values():
        for _, target in entries:
            if target.resolve() in inputs:
                raise DataError("refusing to overwrite an input file", target)
            if target.exists() and not overwrite:
                raise DataError("output exists (use --overwrite to replace it)", target)


__all__ = [
    "PackageError",
    "denoiseg_section",
    "format_summary",
    "predict_package",
    "test_package",
]
