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


#: weight formats that run without executing Python code shipped in (or chosen by) the package;
#: the others (a state dict's architecture file or library callable, Keras, TensorFlow) need
#: ``--trust-package-code``
CODE_FREE_WEIGHT_FORMATS = ("torchscript", "onnx")
TRUST_CODE_FLAG = "--trust-package-code"


@dataclass
class PackageTest:
    """What ``zoo test`` ran: one bioimageio.core summary per tested weight format, and the
    formats left out because they would run the package's code."""

    summaries: list[Any]
    skipped: list[str]

    @property
    def status(self) -> str:
        return "passed" if all(s.status == "passed" for s in self.summaries) else "failed"


def test_package(path: Path, trust_code: bool = False) -> PackageTest:
    """``bioimageio.core.test_model`` on a package, after the safety checks, for each weight
    format that runs without the package's Python code (all formats with ``trust_code``)."""
    from bioimageio.core import test_model

    descr = load_package(Path(path))
    available = list(descr.weights.available_formats)
    formats = [fmt for fmt in available if trust_code or fmt in CODE_FREE_WEIGHT_FORMATS]
    skipped = [fmt for fmt in available if fmt not in formats]
    if not formats:
        raise PackageError(
            f"every weight format of the package ({', '.join(available)}) runs Python code from it; "
            f"re-run with {TRUST_CODE_FLAG} only if you trust where it came from",
            path,
        )
    try:
        summaries = [test_model(Path(path), weight_format=fmt, devices=["cpu"]) for fmt in formats]
    except Exception as exc:  # noqa: BLE001 (bioimageio raises many types for broken packages)
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise PackageError(f"the package cannot be tested ({reason})", path) from None
    return PackageTest(summaries, skipped)


def format_summary(summary: Any) -> str:
    """A compact, readable version of a test summary (one line per check); a
    :class:`PackageTest` lists every tested format and what was skipped."""
    if isinstance(summary, PackageTest):
        lines = [f"status: {summary.status}"]
        for part in summary.summaries:
            lines.extend(format_summary(part).splitlines()[1:])
        for fmt in summary.skipped:
            lines.append(f"  [skipped] {fmt}: would run Python code from the package ({TRUST_CODE_FLAG} to test it)")
        return "\n".join(lines)
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


def preferred_weight_format(descr: Any, trust_code: bool = False, path: Path | None = None) -> str:
    """TorchScript, else ONNX; other formats (whose architecture is Python code named by the
    package) only with ``trust_code``, else a one-line refusal."""
    available = list(descr.weights.available_formats)
    for fmt in (*WEIGHT_FORMAT_PREFERENCE, *available):
        if fmt in available and (trust_code or fmt in CODE_FREE_WEIGHT_FORMATS):
            return fmt
    raise PackageError(
        f"the package's weights ({', '.join(available)}) need Python code from the package to run; "
        f"re-run with {TRUST_CODE_FLAG} only if you trust where it came from",
        path,
    )


def create_pipeline(descr: Any, trust_code: bool = False, path: Path | None = None):
    """bioimageio.core's prediction pipeline for a package, with the preferred weights."""
    from bioimageio.core import create_prediction_pipeline

    weight_format = preferred_weight_format(descr, trust_code, path)
    try:
        return create_prediction_pipeline(descr, weight_format=weight_format)
    except Exception as exc:  # noqa: BLE001 (a weights file the runtime cannot load, in many forms)
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise PackageError(f"cannot load the package's {weight_format} weights ({reason})", path) from None


def package_head(section: dict) -> tuple[Any, Any]:
    """The installed head a denoiseg package names, and the package's instance settings for it
    (a package exported before heads had settings records a scalar ``threshold``: the head's
    primary threshold)."""
    from denoiseg_core.plugin_manager import get_registry

    head_info = section["head"]
    spec = get_registry().spec("head", head_info["name"])
    head = spec.build(spec.params.model_validate(head_info.get("params") or {}))
    if "instance_settings" in section:
        return head, head.settings.model_validate(section["instance_settings"])
    return head, head.settings().with_threshold(float(section["threshold"]))


def denoiseg_instances(section: dict, output: np.ndarray) -> np.ndarray:
    """Instance labels from a denoiseg package's output (C, *spatial) with its head and instance settings."""
    head, settings = package_head(section)
    return head.instances(output[section["output_channels"]["probabilities"]], settings)


def output_paths(descr: Any, inputs: Sequence[Path], out_dir: Path) -> list[tuple[Path, list[tuple[str, Path]]]]:
    """Where each input's results go, in input order: ``[(input, [(kind, path), ...]), ...]``
    (a list: two inputs with the same name must be seen as colliding, not merged)."""
    section = denoiseg_section(descr)
    kinds = ["denoised", "probabilities", "labels"] if section else [str(o.id) for o in descr.outputs]
    return [(Path(p), [(kind, out_dir / f"{Path(p).stem}_{kind}.tif") for kind in kinds]) for p in inputs]


def load_runnable(path: Path):
    """The validated description of a package that ``zoo predict`` can run."""
    descr = load_package(Path(path))
    input_layout(descr)  # one input with supported axes
    section = denoiseg_section(descr)
    if section is not None:
        check_output_channels(descr, section, Path(path))
    return descr


def check_output_channels(descr: Any, section: dict, path: Path) -> None:
    """``config.denoiseg.output_channels`` must index channels the output has (checked before any work)."""
    from bioimageio.spec.model.v0_5 import ChannelAxis

    channels = next((len(a.channel_names) for a in descr.outputs[0].axes if isinstance(a, ChannelAxis)), None)
    try:
        wanted = {kind: [int(i) for i in section["output_channels"][kind]] for kind in ("denoised", "probabilities")}
    except (KeyError, TypeError, ValueError):
        raise PackageError("config.denoiseg.output_channels must list the denoised and probabilities channels", path) from None
    bad = [i for indices in wanted.values() for i in indices if channels is None or not 0 <= i < channels]
    if bad or not all(wanted.values()):
        raise PackageError(
            f"config.denoiseg.output_channels {wanted} do not fit the output's {channels or 0} channels", path
        )


def write_prediction(
    descr: Any,
    outputs: dict[str, np.ndarray],
    targets: list[tuple[str, Path]],
    inputs: Sequence[Path],
    overwrite: bool,
    package: Path | None = None,
) -> None:
    """Write one image's results (denoised/probabilities/labels for denoiseg packages)."""
    from denoiseg_core.io import write_tiff

    section = denoiseg_section(descr)
    if section:
        output = next(iter(outputs.values()))
        try:
            denoised = output[section["output_channels"]["denoised"]]
            data = {
                "denoised": denoised[0] if denoised.shape[0] == 1 else denoised,
                "probabilities": output[section["output_channels"]["probabilities"]],
            }
            labels = denoiseg_instances(section, output)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise PackageError(
                f"config.denoiseg does not fit the model output of shape {output.shape} ({type(exc).__name__}: {exc})",
                package,
            ) from None
        data["labels"] = labels.astype(np.uint16 if labels.max() < 2**16 else np.int32)
    else:
        data = outputs
    for kind, target in targets:
        array = data[kind]
        if array.dtype.kind == "f":
            array = array.astype(np.float32)
        write_tiff(target, array, overwrite=overwrite, inputs=tuple(inputs))


def check_targets(
    targets: list[tuple[Path, list[tuple[str, Path]]]], overwrite: bool, skip_existing: bool = False, package: Path | None = None
) -> list[bool]:
    """Before any work: refuse outputs that exist (without --overwrite), are an input or the
    package, or collide; returns for each input whether it still needs predicting."""
    from denoiseg_core.io import plan_batch_outputs

    inputs = [path for path, _ in targets]
    return plan_batch_outputs(
        [[target for _, target in entries] for _, entries in targets],
        inputs=[*inputs, *([package] if package is not None else [])],
        overwrite=overwrite,
        skip_existing=skip_existing,
    )


def read_finite_image(path: Path) -> np.ndarray:
    """An input image; NaN or infinite pixels are refused (the network would spread them over
    a whole receptive field), as ``denoiseg predict`` does."""
    from denoiseg_core.io import read_image

    image = read_image(path)
    if image.dtype.kind == "f":
        if not np.isfinite(image).all():
            raise DataError("image contains NaN or infinite values", path)
        if image.size and float(np.abs(image).max()) > np.finfo(np.float32).max:
            raise DataError("image has values beyond the float32 range the model computes in", path)
    return image


__all__ = [
    "PackageError",
    "denoiseg_section",
    "format_summary",
    "predict_package",
    "test_package",
]
