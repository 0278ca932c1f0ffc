"""``denoiseg zoo export``: a checkpoint -> a tested bioimage.io model package (format 0.5).

The package is described with bioimageio.spec's own model classes and holds:

* weights as TorchScript, ONNX and a PyTorch state dict with a self-contained architecture
  source (see :mod:`denoiseg_zoo.architecture` and :mod:`denoiseg_core.exportability`);
* one input (batch, channel, [z,] y, x) normalised by ``fixed_zero_mean_unit_variance``
  with the training statistics, sizes ``min + n * step`` from the backbone's size divisor;
* one output with the denoised channel(s) and the head's channels (activation inside
  the network), a halo from the backbone, and ``scale_linear`` de-normalising the denoised
  channel(s);
* test and sample tensors, covers from real predictions, a README with a ``# Validation``
  section, citations, the training config, the head's instance settings in
  ``config.denoiseg``, ``config.deepimagej`` and the head's ImageJ instance macro if it has one.

The exporter only assembles: what the network is comes from the backbone's spec (architecture
source, size divisor, halo, tags), what its segmentation channels mean and how instances are
made from them from the head (:meth:`~denoiseg_core.components.SegmentationHead.outputs`,
``instances_text``, ``imagej_macro``).

The package is written next to ``--out`` under a temporary name, tested with
``bioimageio.core.test_model`` for every weight format, and only renamed onto ``--out`` if
every test passes.
"""

from __future__ import annotations

import math
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from denoiseg_core import __version__, exportability
from denoiseg_core.checkpoint import LoadedModel, load_checkpoint
from denoiseg_core.errors import DataError, DenoiSegError
from denoiseg_core.io import atomic_path, read_image

from denoiseg_zoo import architecture as arch_export
from denoiseg_zoo.covers import cover_png
from denoiseg_zoo.archive import summary_reason

#: marks a package made by denoiseg (``config.denoiseg.format``)
PACKAGE_FORMAT = "denoiseg-package/1"
MACRO_NAME = "denoiseg_instances.ijm"
DEFAULT_LICENSE = "CC-BY-4.0"
#: tags of every package; the backbone's tags (``BackboneSpec.tags``) and the user's are added
DEFAULT_TAGS = ("denoiseg", "noise2void", "denoising", "segmentation", "instance-segmentation", "pytorch")
#: the largest test-tensor edge (keeps the package and its tests small)
TEST_TENSOR_EDGE = 256

CITATIONS = (
    ("Buchholz, Prakash, Schmidt, Krull, Jug. DenoiSeg: Joint Denoising and Segmentation. ECCV 2020 Workshops.",
     "10.1007/978-3-030-66415-2_21"),
    ("Krull, Buchholz, Jug. Noise2Void - Learning Denoising from Single Noisy Images. CVPR 2019.",
     "10.1109/CVPR.2019.00223"),
)


@dataclass
class ExportOptions:
    """What the user chooses about a package (all optional)."""

    name: str | None = None
    authors: Sequence[str] = ()
    description: str | None = None
    license: str = DEFAULT_LICENSE
    tags: Sequence[str] = ()
    samples: Sequence[Path] = ()
    masks: Sequence[Path] = ()
    overwrite: bool = False


@dataclass
class ExportResult:
    path: Path
    summary: Any
    torchscript_how: str
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TensorGeometry:
    """Sizes of the package's tensors: ``min + n * step`` per spatial axis, output halo."""

    min_size: int
    step: int
    halo: int

    def valid_size_at_most(self, size: int) -> int:
        """The largest valid size <= ``size`` (at least the minimum)."""
        if size <= self.min_size:
            return self.min_size
        return self.min_size + (size - self.min_size) // self.step * self.step


def geometry_for(model: LoadedModel) -> TensorGeometry:
    """Tile geometry from the backbone: halo rounded up to the size divisor (so every tile
    bioimage.io cuts starts on the network's pooling grid), minimum = 2 * halo + divisor."""
    divisor = max(1, int(model.built.size_divisor))
    halo = int(math.ceil(max(1, int(model.built.halo)) / divisor) * divisor)
    return TensorGeometry(min_size=2 * halo + divisor, step=divisor, halo=halo)


# --------------------------------------------------------------------------- inputs


def to_model_layout(image: np.ndarray, model: LoadedModel, path: Path) -> np.ndarray:
    """A sample image as ``(C, *spatial)`` float32, or a one-line error naming the file."""
    image = np.asarray(image)
    if image.ndim == model.ndim and model.in_channels == 1:
        image = image[None]
    if image.ndim != model.ndim + 1 or image.shape[0] != model.in_channels:
        raise DataError(
            f"image of shape {image.shape} does not fit the model ({model.in_channels} channel(s), {model.ndim}-D)", path
        )
    return image.astype(np.float32)


def _synthetic_sample(model: LoadedModel, size: int) -> np.ndarray:
    """A synthetic nuclei image scaled to the training statistics (when no sample is given)."""
    from denoiseg_core.synthetic import make_nuclei_image

    shape = (min(size, 32),) * (model.ndim - 2) + (size, size)
    _, noisy, _ = make_nuclei_image(shape, np.random.default_rng(0))
    noisy = (noisy - noisy.mean()) / max(float(noisy.std()), 1e-6)
    return model.normalization.denormalize(np.broadcast_to(noisy, (model.in_channels, *noisy.shape)))


def test_window(image: np.ndarray, geometry: TensorGeometry) -> np.ndarray:
    """A centred crop (reflect-padded if too small) of ``(C, *spatial)`` with valid sizes."""
    out = image
    for axis in range(1, image.ndim):
        size = out.shape[axis]
        target = geometry.valid_size_at_most(min(size, max(TEST_TENSOR_EDGE, geometry.min_size)))
        if size < target:
            pad = [(0, 0)] * out.ndim
            pad[axis] = (0, target - size)
            out = np.pad(out, pad, mode="symmetric")
        else:
            start = (size - target) // 2
            out = np.take(out, np.arange(start, start + target), axis=axis)
    return np.ascontiguousarray(out, dtype=np.float32)


def _reference_output(model: LoadedModel, raw_batch: np.ndarray) -> np.ndarray:
    """What the package must produce for ``raw_batch`` (N, C, *s): eager PyTorch, with the
    package's pre- and postprocessing applied the way bioimageio.core applies them."""
    net = model.inference_net()
    with torch.inference_mode():
        output = net(torch.from_numpy(model.normalization.normalize(raw_batch, model.ndim))).numpy()
    output = output.copy()
    output[:, : model.in_channels] = model.normalization.denormalize(output[:, : model.in_channels], model.ndim)
    return output.astype(np.float32)


# --------------------------------------------------------------------------- description


def _check_name(name: str) -> str:
    allowed = re.compile(r"^[A-Za-z0-9_+\- ()]{5,128}$")
    if not allowed.match(name):
        raise DenoiSegError(
            f"--name {name!r}: a bioimage.io model name has 5-128 characters: letters, digits, spaces and _+-()"
        )
    return name


def _clean_json(value: Any) -> Any:
    """Plain YAML-safe values (NaN/inf -> None, tuples -> lists)."""
    if isinstance(value, dict):
        return {str(k): _clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_json(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def _evaluations(model: LoadedModel, sample_scores: dict | None) -> dict[str, dict]:
    extra = model.state.get("extra") or {}
    found: dict[str, dict] = {}
    for key, title in (("evaluation", "Evaluation recorded in the checkpoint"),
                       ("validation", "Validation data used during training (tuning the instance settings)")):
        value = extra.get(key)
        if isinstance(value, dict) and value:
            found[title] = value
    if sample_scores:
        found["Export samples with the given masks"] = sample_scores
    return found


def build_description(
    model: LoadedModel,
    files: dict[str, Path],
    geometry: TensorGeometry,
    options: ExportOptions,
    arch: arch_export.ArchitectureExport,
    config_section: dict,
    torchscript_comment: str,
) -> Any:
    """The ``ModelDescr`` (v0.5) of the package; ``files`` maps roles to local files."""
    from bioimageio.spec.model.v0_5 import (
        ArchitectureFromFileDescr,
        Author,
        AxisId,
        BatchAxis,
        ChannelAxis,
        CiteEntry,
        Doi,
        FileDescr,
        FixedZeroMeanUnitVarianceAlongAxisKwargs,
        FixedZeroMeanUnitVarianceDescr,
        FixedZeroMeanUnitVarianceKwargs,
        Identifier,
        InputTensorDescr,
        LicenseId,
        ModelDescr,
        OnnxWeightsDescr,
        OutputTensorDescr,
        ParameterizedSize,
        PytorchStateDictWeightsDescr,
        ScaleLinearAlongAxisKwargs,
        ScaleLinearDescr,
        SizeReference,
        SpaceInputAxis,
        SpaceOutputAxisWithHalo,
        TensorId,
        TorchscriptWeightsDescr,
        Version,
        WeightsDescr,
    )

    head_channels = model.built.head.outputs().channels
    spatial_ids = ["z", "y", "x"][-model.ndim :]
    input_id, output_id = TensorId("input"), TensorId("output")
    in_names = ["raw"] if model.in_channels == 1 else [f"raw{c}" for c in range(model.in_channels)]
    denoised_names = ["denoised"] if model.in_channels == 1 else [f"denoised{c}" for c in range(model.in_channels)]
    mean = [float(v) for v in model.normalization.mean]
    std = [max(float(v), 1e-6) for v in model.normalization.std]

    if model.in_channels == 1:
        normalise = FixedZeroMeanUnitVarianceDescr(kwargs=FixedZeroMeanUnitVarianceKwargs(mean=mean[0], std=std[0]))
    else:
        normalise = FixedZeroMeanUnitVarianceDescr(
            kwargs=FixedZeroMeanUnitVarianceAlongAxisKwargs(axis=AxisId("channel"), mean=mean, std=std)
        )
    gain, offset = std + [1.0] * len(head_channels), mean + [0.0] * len(head_channels)
    # bioimageio rejects an identity scale_linear (training data already had mean 0, std 1)
    identity = all(g == 1.0 for g in gain) and all(o == 0.0 for o in offset)
    denormalise = [] if identity else [
        ScaleLinearDescr(kwargs=ScaleLinearAlongAxisKwargs(axis=AxisId("channel"), gain=gain, offset=offset))
    ]
    input_descr = InputTensorDescr(
        id=input_id,
        description="raw microscopy image (any intensity range; normalised by the package)",
        axes=[
            BatchAxis(),
            ChannelAxis(channel_names=[Identifier(n) for n in in_names]),
            *[
                SpaceInputAxis(id=AxisId(a), size=ParameterizedSize(min=geometry.min_size, step=geometry.step))
                for a in spatial_ids
            ],
        ],
        test_tensor=FileDescr(source=files["test_input"]),
        sample_tensor=FileDescr(source=files["sample_input"]),
        preprocessing=[normalise],
    )
    output_descr = OutputTensorDescr(
        id=output_id,
        # bioimage.io allows 128 characters; what each channel holds is in the README and config.denoiseg
        description=("denoised image (input intensity units), then the head's channels " + "/".join(c.name for c in head_channels))[:128],
        axes=[
            BatchAxis(),
            ChannelAxis(channel_names=[Identifier(n) for n in denoised_names + [c.name for c in head_channels]]),
            *[
                SpaceOutputAxisWithHalo(
                    id=AxisId(a), halo=geometry.halo, size=SizeReference(tensor_id=input_id, axis_id=AxisId(a))
                )
                for a in spatial_ids
            ],
        ],
        test_tensor=FileDescr(source=files["test_output"]),
        sample_tensor=FileDescr(source=files["sample_output"]),
        postprocessing=denormalise,
    )
    torch_version = Version(torch.__version__.split("+")[0])
    weights = WeightsDescr(
        pytorch_state_dict=PytorchStateDictWeightsDescr(
            source=files["state_dict"],
            architecture=ArchitectureFromFileDescr(
                source=files["architecture"], callable=Identifier(arch.callable_name), kwargs=arch.kwargs
            ),
            pytorch_version=torch_version,
            comment="weights of denoiseg's inference network (backbone + head activation)",
        ),
        torchscript=TorchscriptWeightsDescr(
            source=files["torchscript"],
            pytorch_version=torch_version,
            parent="pytorch_state_dict",
            comment=torchscript_comment,
        ),
        onnx=OnnxWeightsDescr(
            source=files["onnx"],
            opset_version=exportability.ONNX_OPSET,
            parent="pytorch_state_dict",
            comment="single file, no external data",
        ),
    )
    try:
        license_id = LicenseId(options.license)
    except Exception:
        raise DenoiSegError(
            f"--license {options.license!r} is not an SPDX license id known to bioimage.io (e.g. CC-BY-4.0, MIT, BSD-3-Clause)"
        ) from None
    tags = list(dict.fromkeys([*DEFAULT_TAGS, *model.built.backbone_spec.tags, f"{model.ndim}d", *options.tags]))
    attachments = [FileDescr(source=files[k]) for k in ("training_config", "macro") if k in files]
    return ModelDescr(
        name=options.name,
        description=options.description,
        authors=[Author(name=a) for a in options.authors],
        cite=[CiteEntry(text=text, doi=Doi(doi)) for text, doi in CITATIONS],
        license=license_id,
        tags=tags,
        documentation=FileDescr(source=files["readme"]),
        covers=[FileDescr(source=files[k]) for k in sorted(files) if k.startswith("cover")],
        attachments=attachments,
        inputs=[input_descr],
        outputs=[output_descr],
        weights=weights,
        config=config_section,
    )


# --------------------------------------------------------------------------- export


def _test_package(path: Path):
    from bioimageio.core import test_model

    return test_model(path, devices=["cpu"])


def export_package(
    checkpoint: Path,
    out: Path,
    options: ExportOptions | None = None,
    log: Callable[[str], None] = lambda message: None,
    registry: Any = None,
    *,
    samples: Sequence[Path] | None = None,
    sample_masks: Sequence[Path] | None = None,
    overwrite: bool | None = None,
    **option_fields: Any,
) -> ExportResult:
    """Export ``checkpoint`` (a file or run folder) as a bioimage.io package at ``out``;
    nothing is written there unless every weight format passes ``bioimageio.core.test_model``.

    The package's metadata comes from ``options`` or, equivalently, keyword arguments
    (``name``, ``authors``, ``description``, ``license``, ``tags``, ``samples``,
    ``sample_masks``, ``overwrite``). ``registry`` (default: the installed plugins)
    resolves the checkpoint's components.
    """
    options = options or ExportOptions()
    overrides = dict(option_fields)
    if samples is not None:
        overrides["samples"] = list(samples)
    if sample_masks is not None:
        overrides["masks"] = list(sample_masks)
    if overwrite is not None:
        overrides["overwrite"] = overwrite
    unknown = set(overrides) - set(ExportOptions.__dataclass_fields__)
    if unknown:
        raise TypeError(f"export_package() got unexpected keyword arguments {sorted(unknown)}")
    options = ExportOptions(**{**options.__dict__, **overrides})
    from bioimageio.spec import save_bioimageio_package
    from pydantic import ValidationError

    from denoiseg_core.evaluation import instance_settings, segment
    from denoiseg_core.prediction import predict_image

    out = Path(out)
    if out.suffix.lower() != ".zip":
        raise DenoiSegError("the package name must end in .zip", out)
    if out.exists() and not options.overwrite:
        raise DenoiSegError("output exists (use --overwrite to replace it)", out)
    if options.masks and len(options.masks) != len(options.samples):
        raise DenoiSegError(f"{len(options.masks)} --mask for {len(options.samples)} --sample; give one mask per sample or none")

    model = load_checkpoint(Path(checkpoint), registry=registry)
    built = model.built
    geometry = geometry_for(model)
    arch = arch_export.architecture_export(built)
    head_params = built.head_spec.params.model_validate(model.config.model.head.params).model_dump(mode="json")
    settings = instance_settings(model)
    label = Path(checkpoint).name if Path(checkpoint).is_dir() else Path(checkpoint).stem
    label = re.sub(r"[^A-Za-z0-9_+\- ()]", "-", label)[:80]
    name = _check_name(options.name or f"DenoiSeg {label} {model.ndim}D")
    authors = list(options.authors) or ["Unknown author"]
    if not options.authors:
        log("note: no --author given; the package lists 'Unknown author'")
    description = options.description or (
        f"DenoiSeg: joint Noise2Void denoising and instance segmentation of {model.ndim}D microscopy images "
        f"({built.backbone_spec.name} backbone, {built.head_spec.name} head)."
    )
    options = ExportOptions(**{**options.__dict__, "name": name, "authors": authors, "description": description})

    samples = [to_model_layout(read_image(p), model, Path(p)) for p in options.samples]
    masks = [np.asarray(read_image(p)) for p in options.masks]
    for sample, mask, path in zip(samples, masks, options.masks):
        if mask.shape != sample.shape[1:]:
            raise DataError(f"mask shape {mask.shape} differs from its sample's spatial shape {sample.shape[1:]}", path)
    synthetic = not samples
    if synthetic:
        samples = [_synthetic_sample(model, max(geometry.min_size, 128))]
        log("note: no --sample given; test tensors and cover use a synthetic nuclei image")

    # Real predictions for the covers (and the sample scores when masks were given).
    predictions = [predict_image(model, s) for s in samples]
    labels = [segment(model, p, settings) for p in predictions]
    sample_scores = None
    if masks:
        from denoiseg_core.metrics import evaluate_segmentation

        scores = evaluate_segmentation(masks, labels, names=[Path(p).name for p in options.samples])
        sample_scores = {k: v for k, v in scores.items() if k != "per_image"}

    test_input = test_window(samples[0], geometry)[None]
    test_output = _reference_output(model, test_input)
    evaluations = _evaluations(model, sample_scores)

    with tempfile.TemporaryDirectory(prefix="denoiseg-export-") as tmp_name:
        tmp = Path(tmp_name)
        files: dict[str, Path] = {}

        def put(role: str, filename: str, data: bytes | str) -> None:
            path = tmp / filename
            if isinstance(data, str):
                path.write_text(data, encoding="utf-8")
            else:
                path.write_bytes(data)
            files[role] = path

        np.save(tmp / "test_input.npy", test_input)
        np.save(tmp / "test_output.npy", test_output)
        files["test_input"], files["test_output"] = tmp / "test_input.npy", tmp / "test_output.npy"
        _write_sample_tiffs(tmp, files, test_input[0], test_output[0], model)

        # weights (each checked against the eager network on the test input)
        inference = model.inference_net()
        example = torch.from_numpy(model.normalization.normalize(test_input, model.ndim))
        log("exporting weights: pytorch_state_dict, torchscript, onnx")
        put("architecture", "denoiseg_architecture.py", arch.source)
        put("state_dict", "weights.pt", exportability.state_dict_bytes(built.net))
        exportability.check_architecture_rebuilds(
            files["architecture"], arch.callable_name, arch.kwargs, built.net.state_dict(), inference, example,
            built.backbone_spec.name,
        )
        torchscript, how = exportability.export_torchscript(
            inference, example, built.backbone_spec.name, step=geometry.step
        )
        put("torchscript", "weights_torchscript.pt", torchscript)
        put("onnx", "weights.onnx", exportability.export_onnx(inference, example, built.backbone_spec.name))

        put("training_config", "training_config.yaml", yaml.safe_dump(_clean_json(model.config.model_dump(mode="json")), sort_keys=False))
        macro = built.head.imagej_macro(settings, model.in_channels)
        if macro is not None:
            put("macro", MACRO_NAME, macro)
        else:
            log(f"note: head {built.head_spec.name!r} has no ImageJ macro; none packaged")
        for index, (sample, prediction, label) in enumerate(zip(samples[:2], predictions[:2], labels[:2])):
            put(f"cover{index}", f"cover{index}.png", cover_png(sample, prediction.denoised, label))
        put(
            "readme",
            "README.md",
            _readme(model, options, geometry, evaluations, head_params, macro is not None),
        )
        config_section = _config_section(
            model, geometry, head_params, evaluations, test_input, test_output, synthetic, macro is not None
        )
        try:
            descr = build_description(model, files, geometry, options, arch, config_section, f"{how} with torch {torch.__version__}")
        except ValidationError as exc:
            raise DenoiSegError(f"cannot describe the package: {_pydantic_reason(exc)}") from None

        with atomic_path(out, suffix=".partial.zip") as partial:
            log("writing and testing the package (bioimageio.core test_model, every weight format)")
            try:
                save_bioimageio_package(descr, output_path=partial)
            except Exception as exc:
                raise DenoiSegError(f"bioimageio.spec refused the package: {' '.join(str(exc).split())[:500]}") from None
            summary = _test_package(partial)
            if summary.status != "passed":
                raise DenoiSegError(
                    f"the package failed bioimageio.core's test, nothing written: {summary_reason(summary, limit=5)}", out
                )
            if out.exists() and not options.overwrite:  # appeared while exporting
                raise DenoiSegError("output exists (use --overwrite to replace it)", out)
    return ExportResult(path=out, summary=summary, torchscript_how=how)


def _write_sample_tiffs(tmp: Path, files: dict[str, Path], sample: np.ndarray, output: np.ndarray, model: LoadedModel) -> None:
    """Sample tensors as TIFF (viewable by people): the test window's raw input and output."""
    import tifffile

    raw = sample[0] if model.in_channels == 1 else sample
    tifffile.imwrite(tmp / "sample_input.tif", raw.astype(np.float32), photometric="minisblack")
    tifffile.imwrite(tmp / "sample_output.tif", output.astype(np.float32), photometric="minisblack")
    files["sample_input"], files["sample_output"] = tmp / "sample_input.tif", tmp / "sample_output.tif"


def _pydantic_reason(exc: Exception) -> str:
    errors = getattr(exc, "errors", lambda: [])()
    if not errors:
        return str(exc).splitlines()[0]
    first = errors[0]
    return f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg', '')}"


def _config_section(
    model: LoadedModel,
    geometry: TensorGeometry,
    head_params: dict,
    evaluations: dict,
    test_input: np.ndarray,
    test_output: np.ndarray,
    synthetic: bool,
    has_macro: bool,
) -> dict:
    head = model.built.head
    outputs = head.outputs()
    settings = model.instance_settings
    n = model.in_channels
    spatial = test_input.shape[2:]
    ij_size = lambda shape, channels: " x ".join(map(str, [shape[-1], shape[-2], shape[-3] if len(shape) == 3 else 1, channels]))  # noqa: E731
    return _clean_json(
        {
            "denoiseg": {
                "format": PACKAGE_FORMAT,
                "denoiseg_version": __version__,
                "torch_version": torch.__version__,
                "ndim": model.ndim,
                "in_channels": n,
                "normalization": model.normalization.to_dict(),
                "instance_settings": settings.model_dump(mode="json"),
                "instance_settings_tuned": model.tuned_settings is not None,
                "size_divisor": int(model.built.size_divisor),
                "backbone_halo": int(model.built.halo),
                "halo": geometry.halo,
                # "probabilities": the head's channels (class probabilities for the built-in heads)
                "output_channels": {"denoised": list(range(n)), "probabilities": list(range(n, n + head.num_classes))},
                "backbone": {"name": model.config.model.backbone.name, "params": model.built.backbone_params.model_dump(mode="json")},
                "head": {
                    "name": model.config.model.head.name,
                    "params": head_params,
                    "channels": [
                        {"name": c.name, "role": c.role, "description": c.description, "channel": n + i}
                        for i, c in enumerate(outputs.channels)
                    ],
                },
                "instances": {
                    "settings": settings.model_dump(mode="json"),
                    "description": head.instances_text(settings),
                    "imagej_macro": MACRO_NAME if has_macro else None,
                },
                "training_config": model.config.model_dump(mode="json"),
                "evaluation": evaluations,
                "epoch": model.state.get("epoch"),
                "synthetic_sample": synthetic,
            },
            "deepimagej": {
                "pyramidal_model": False,
                "allow_tiling": True,
                "model_keys": None,
                "prediction": {
                    "preprocess": [{"spec": None}],
                    "postprocess": [{"spec": "ij.IJ::runMacroFile", "kwargs": MACRO_NAME} if has_macro else {"spec": None}],
                },
                "test_information": {
                    "inputs": [{"name": "test_input.npy", "size": ij_size(spatial, n), "pixel_size": {"x": 1.0, "y": 1.0, "z": 1.0}}],
                    "outputs": [{"name": "test_output.npy", "type": "image", "size": ij_size(spatial, test_output.shape[1])}],
                    "memory_peak": None,
                    "runtime": None,
                },
            },
        }
    )


def _readme(
    model: LoadedModel,
    options: ExportOptions,
    geometry: TensorGeometry,
    evaluations: dict,
    head_params: dict,
    has_macro: bool,
) -> str:
    from denoiseg_zoo.documentation import readme

    config = model.config
    built = model.built
    outputs = built.head.outputs()
    denoised = ["denoised"] if model.in_channels == 1 else [f"denoised{c}" for c in range(model.in_channels)]
    training = {
        "backbone": f"{config.model.backbone.name} {built.backbone_params.model_dump(mode='json')}",
        "head": f"{config.model.head.name} {head_params}",
        "masking": config.model.masking.name,
        "alpha (denoising weight)": config.training.alpha,
        "loss weighting": config.training.loss_weighting,
        "epochs trained": model.state.get("epoch"),
        "patch size": config.data.patch_size,
        "batch size": config.training.batch_size,
        "learning rate": config.training.learning_rate,
        "labelled images": config.data.n_labelled if config.data.n_labelled is not None else "all",
        "denoiseg version": model.versions.get("denoiseg", __version__),
    }
    return readme(
        name=options.name or "DenoiSeg model",
        description=options.description or "",
        ndim=model.ndim,
        in_channels=model.in_channels,
        channel_names=denoised + [c.name for c in outputs.channels],
        min_size=geometry.min_size,
        step=geometry.step,
        halo=geometry.halo,
        mean=model.normalization.mean,
        std=model.normalization.std,
        network=f"a `{built.backbone_spec.name}` network ({built.backbone_spec.description})",
        head=f"the `{built.head_spec.name}` head ({built.head_spec.description})",
        head_outputs=outputs.summary,
        instances=built.head.instances_text(model.instance_settings),
        settings=model.instance_settings.describe(),
        macro_name=MACRO_NAME if has_macro else None,
        evaluations=evaluations,
        training_summary=training,
    )
